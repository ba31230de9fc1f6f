"""Shared test fixtures: tiny random models and token-id pairs, built offline."""

import math
import random
import socket

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config

from prefopt.attention import install_segmented_sdpa
from prefopt.collate import collator_for
from prefopt.config import build_config
from prefopt.trainer import PreferenceTrainer

V = 101  # vocabulary of the random-id models; 0 = pad, 1 = bos, 2 = eos


def tiny_random_model(arch: str = "llama", seed: int = 0):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                         output_router_logits=True, router_aux_loss_coef=0.02),
    }[arch]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def random_pairs(n: int, seed: int = 0, max_prompt: int = 7, max_completion: int = 9) -> list[dict]:
    """Pairs of random ids with BOS/EOS and uneven lengths (so padding and token counts matter)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, V) for _ in range(k)]  # noqa: E731
    return [
        dict(prompt_ids=[1] + ids(rng.randint(1, max_prompt)),
             chosen_ids=ids(rng.randint(1, max_completion)) + [2],
             rejected_ids=ids(rng.randint(1, max_completion)) + [2],
             source="random", row=i)
        for i in range(n)
    ]


def make_trainer(model, config_keys: dict, tmp_path, pairs=None, eval_pairs=None, callbacks=None,
                 layout: str = "padded", **training) -> PreferenceTrainer:
    cfg = build_config({"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True,
                        "logging_steps": 1, "save_strategy": "no", **config_keys, **training})
    if layout != "padded" and model.config._attn_implementation == "sdpa":
        install_segmented_sdpa()  # as the pipeline does for packed rows
    return PreferenceTrainer(
        model=model,
        args=cfg.training,
        train_dataset=Dataset.from_list(pairs) if pairs else None,
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        callbacks=callbacks,
        data_collator=collator_for(cfg, pad_token_id=0, layout=layout,
                                   attn_implementation=model.config._attn_implementation),
        objective=cfg.objective,
    )


def free_port() -> int:
    """A TCP port nobody listens on, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- comparing two computations whose arithmetic differs only in rounding ------------------------
#
# Two runs of the same training (another layout, micro-batch split, process count, launcher) add
# the same float32 numbers in another order. What that does to a number depends on how far it is
# from one step's loss and gradients:
#
# - one step from the same weights on the same pairs (a loss, its metrics, its gradients): the
#   round-off of a K-term float32 sum grows like √K·u relative to its terms (u = 2⁻²⁴ ≈ 6e-8);
#   the longest chains here are ~10³ terms (a 300-way log-sum-exp of 64-term dot products, summed
#   over ~200 tokens): ~2e-6. ROUND_OFF_REL allows 5×.
# - after Adam steps, the weights differ as `assert_adam_weights_close` bounds: the bulk by 2e-4
#   of the most an element can move, a few elements (those whose gradients are near zero) by more.
#   A logged value is a smooth function of the weights, and the outlying elements barely move the
#   loss (its gradient is what is near zero there): to first order it agrees to ~2e-4 of how much
#   it changes in training, at most its size here: AFTER_ADAM_REL.
U = 2.0 ** -24  # float32 unit round-off: one rounding is within U of exact, relatively
ROUND_OFF_REL = 1e-5
AFTER_ADAM_REL = 2e-4
# logits/* are h·mean_v(W_v): 64 terms |h_j|·|mean_v W_vj| of ~1 × 1e-3 with mixed signs, so a
# mean logit near zero still carries the round-off of terms of total size ~0.1
LOGIT_TERMS = 0.1


def assert_grads_close(ours: dict, reference: dict):
    """One step's gradients, summed in another order. An element is a sum of per-token terms of
    both signs, so its round-off is relative to the size of those terms, not to the element (which
    may cancel to near zero): to ROUND_OFF_REL of the tensor's largest element."""
    assert ours.keys() == reference.keys()
    for name, g in reference.items():
        torch.testing.assert_close(ours[name], g, rtol=0, atol=ROUND_OFF_REL * g.abs().max().item(), msg=name)


def logged_scale(line: dict, key: str) -> float:
    """The size of the terms `line[key]` is summed from: its round-off is relative to this."""
    if key.endswith("rewards/margins"):  # chosen − rejected, each of the size of the chosen reward
        return max(abs(line[key]), abs(line[key.replace("margins", "chosen")]))
    if key.endswith("log_odds_chosen"):  # log-odds of chosen − rejected, each about |log p|
        return max(abs(line[key]), abs(line[key.replace("log_odds_chosen", "logps/chosen")]))
    if "logits/" in key:
        return max(abs(line[key]), LOGIT_TERMS)
    return abs(line[key])


def assert_logged_close(a: dict, b: dict, keys, rel: float):
    """Line `b` of a metrics log holds `a`'s values for `keys`, each to `rel` of its scale."""
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=0, abs=rel * logged_scale(a, key)), (a.get("step"), key)


def adam_ratio_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """max |m̂_t / √v̂_t| over all gradient sequences (Cauchy–Schwarz): 1 at t = 1, 1.03 at t = 8."""
    s = sum((beta1 * beta1 / beta2) ** k for k in range(t))
    return (1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2) * s)


def assert_adam_weights_close(reference: dict, other: dict, lr: float, steps: int, start: dict | None):
    """Weights after `steps` AdamW steps (peak rate `lr`) from the same start, in two runs whose
    gradients differ by round-off.

    Adam moves an element by lr_t·m̂/(√v̂ + ε) a step, and |m̂/√v̂| ≤ C_t whatever the gradients
    (`adam_ratio_bound`): the step depends on the element's own gradients only up to their scale.
    Where they stand well above their round-off (relative ρ), the two runs' steps agree to ~ρ of
    a step. Where they cancel to nearly nothing (in one step's sum over tokens, or across steps in
    m̂), round-off decides the ratio, which then may be anything in [−C_t, C_t] in either run. So:

    - every element agrees within 2·C·steps·lr, the two extremes (0.04 for 4 steps of 5e-3);
    - the bulk within 2e-4·steps·lr: a gradient whose sum is at least 1/100 of its terms has
      ρ ≤ 100 × ~2e-6 (ROUND_OFF_REL's derivation) = 2e-4. All but at most 1% of each tensor's
      elements (and one at least) must be in the bulk. How many gradients cancel further is a
      property of the data, not of the arithmetic: measured at most 3 of the 4096 o_proj weights
      of layer 1 (AMD EPYC, AVX-512; the largest 1.8e-5 off; on a Xeon with AMX one was 3.15e-5
      off). A sharding or synchronisation fault moves whole tensors or shards: far more than 1%.
    - with `start`, the reference moved most elements by 100 times the bulk tolerance (the
      comparison is not vacuous).
    """
    every = 2 * adam_ratio_bound(steps) * steps * lr
    bulk = 2e-4 * steps * lr
    assert reference.keys() == other.keys()
    for name, w in reference.items():
        off = (other[name] - w).abs()
        assert off.max().item() <= every, (name, off.max().item(), every)
        outside = int((off > bulk).sum())
        allowed = max(1, w.numel() // 100)
        assert outside <= allowed, f"{name}: {outside} of {w.numel()} elements differ by more than {bulk:.1e}"
    if start is not None:
        moved = sum(int(((w - start[name]).abs() > 100 * bulk).sum()) for name, w in reference.items())
        assert moved > sum(w.numel() for w in reference.values()) / 2

