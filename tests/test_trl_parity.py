"""Parity with TRL 1.16 on identical token ids and weights: loss, every metric TRL logs (bar
`logits/*`, which TRL averages over prompt and padding positions too) and every gradient.

TRL's own `get_batch_loss_metrics` runs on TRL's own padded batch; prefopt's config is given
the very YAML keys a TRL user writes, so the dialect mapping is under test as well.
"""

import copy
import os

import pytest
import torch
from accelerate import Accelerator

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.experimental.utils import DPODataCollatorWithPadding  # noqa: E402

from helpers import (ROUND_OFF_REL, assert_grads_close, assert_logged_close, make_trainer,  # noqa: E402
                     random_pairs, tiny_random_model)

TRL_DEFAULTS = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0)

# (TRL trainer, TRL keys). The same keys go to prefopt, plus `method: orpo` for ORPO.
CASES = {
    "cpo-sigmoid": ("cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)),
    "cpo-sigmoid-smoothed": ("cpo", dict(loss_type="sigmoid", beta=0.5, cpo_alpha=1.0, label_smoothing=0.2)),
    "cpo-hinge": ("cpo", dict(loss_type="hinge", beta=0.3, cpo_alpha=1.0)),
    "cpo-ipo": ("cpo", dict(loss_type="ipo", beta=0.4, cpo_alpha=0.5)),
    "simpo": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)),
    "simpo-smoothed": ("cpo", dict(loss_type="simpo", beta=2.5, simpo_gamma=0.7, cpo_alpha=0.0, label_smoothing=0.1)),
    "cpo-simpo": ("cpo", dict(loss_type="simpo", beta=10.0, simpo_gamma=5.4, cpo_alpha=0.05)),
    "alphapo": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, alpha=0.25)),
    "cpo-alpha-shaped": ("cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, alpha=0.1)),
    "orpo": ("orpo", dict(beta=0.1)),
    "orpo-strong": ("orpo", dict(beta=1.0)),
}


def trl_batch(pairs):
    feats = []
    for p in pairs:
        P = len(p["prompt_ids"])
        f = {"prompt_input_ids": p["prompt_ids"], "prompt_attention_mask": [1] * P}
        for side in ("chosen", "rejected"):
            ids = p["prompt_ids"] + p[f"{side}_ids"]
            f[f"{side}_input_ids"], f[f"{side}_attention_mask"] = ids, [1] * len(ids)
            f[f"{side}_labels"] = [-100] * P + p[f"{side}_ids"]
        feats.append(f)
    return DPODataCollatorWithPadding(pad_token_id=0)(feats)


def trl_loss_and_metrics(kind, keys, model, pairs):
    cls = CPOTrainer if kind == "cpo" else ORPOTrainer
    trl = cls.__new__(cls)  # the loss code only, without the trainer's dataset and model set-up
    params = {**TRL_DEFAULTS, **keys}
    trl.__dict__.update(params, is_encoder_decoder=False, pad_token_id=0, padding_value=0,
                        accelerator=Accelerator(cpu=True))
    config = model.config
    trl.aux_loss_enabled = getattr(config, "output_router_logits", False)
    trl.aux_loss_coef = getattr(config, "router_aux_loss_coef", 0.0)
    return trl.get_batch_loss_metrics(model, trl_batch(pairs), train_eval="train")


def prefopt_loss_and_metrics(kind, keys, model, pairs, tmp_path, layout="padded"):
    config_keys = dict(keys, method="orpo") if kind == "orpo" else dict(keys)
    trainer = make_trainer(model, config_keys, tmp_path, layout=layout)
    batch = trainer.data_collator(pairs)
    loss = trainer.compute_loss(model, batch)
    trainer.log({"loss": loss.item()})
    return loss, trainer.state.log_history[-1]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_norm(g: dict) -> float:
    return torch.linalg.vector_norm(torch.stack([v.norm() for v in g.values()])).item()


@pytest.mark.parametrize("arch, layout", [("llama", "padded"), ("qwen2", "padded"), ("llama", "packed")])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_metrics_and_gradients_equal_trl(case, arch, layout, tmp_path):
    kind, keys = CASES[case]
    pairs = random_pairs(4, seed=3)
    ours_model = tiny_random_model(arch)
    trl_model = copy.deepcopy(ours_model)

    trl_loss, trl_metrics = trl_loss_and_metrics(kind, keys, trl_model, pairs)
    trl_loss.backward()
    loss, logged = prefopt_loss_and_metrics(kind, keys, ours_model, pairs, tmp_path, layout)
    loss.backward()

    # the same step on the same weights, summed in another order (tests/helpers.py: ROUND_OFF_REL);
    # the loss is a sum of non-negative terms, so its round-off is relative to itself
    assert loss.item() == pytest.approx(trl_loss.item(), rel=ROUND_OFF_REL)
    compared = [k for k in trl_metrics if not k.startswith("logits/")]
    assert len(compared) >= 7
    assert_logged_close(trl_metrics, logged, compared, ROUND_OFF_REL)
    ours, theirs = grads(ours_model), grads(trl_model)
    assert_grads_close(ours, theirs)
    assert grad_norm(ours) == pytest.approx(grad_norm(theirs), rel=ROUND_OFF_REL)


def test_moe_router_aux_loss_is_added_and_logged_as_trl_does(tmp_path):
    keys = dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
    pairs = random_pairs(4, seed=5)
    ours_model = tiny_random_model("mixtral")
    trl_model = copy.deepcopy(ours_model)
    trl_loss, _ = trl_loss_and_metrics("cpo", keys, trl_model, pairs)
    loss, logged = prefopt_loss_and_metrics("cpo", keys, ours_model, pairs, tmp_path)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=ROUND_OFF_REL)
    assert logged["aux_loss"] > 0
    # and the aux term really is in the loss: without it the numbers differ
    ours_model.config.output_router_logits = False
    plain, _ = prefopt_loss_and_metrics("cpo", keys, ours_model, pairs, tmp_path)
    assert plain.item() == pytest.approx(loss.item() - 0.02 * logged["aux_loss"], rel=ROUND_OFF_REL)
