"""bf16, one real training step: a shipped config through the CLI as shipped (bf16 weights, CPU
autocast) and in fp32, on the same tiny model and data; what ran is asserted, and the logged loss
differs from fp32's only as much as bf16 rounding of the hidden states and the head explains.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open

import prefopt.pipeline
import prefopt.scoring
from bf16_helpers import EPS, SAFETY, assert_within, hidden_budget, logit_error, logp_error
from prefopt.cli import main
from prefopt.config import load_config
from prefopt.gradahead import ahead_scores
from prefopt.logprobs import token_logps
from test_shipped_configs import CONFIGS, local  # noqa: F401 (the fixture: a tiny local model and data)


def record_the_step(monkeypatch) -> dict:
    """What the CLI's run does, recorded into the dict returned: the training step's token log-probs
    (their gradient retained), targets, head dtype and weights, and final hidden states at the scored
    positions; the model's config; and how its first layer ran (autocast, output and weight dtypes)."""
    seen = {}

    def recording(hidden, index, target, head, *args, scorer=token_logps, **kwargs):
        tok = scorer(hidden, index, target, head, *args, **kwargs)
        if tok is not None and tok.logps.requires_grad and "logps" not in seen:  # the training step's
            tok.logps.retain_grad()
            seen.update(logps=tok.logps, target=target, head_dtype=head.weight.dtype,
                        weight=head.weight.detach().double().clone(),
                        h=hidden.reshape(-1, hidden.shape[-1])[index].detach().double())
        return tok

    def layer_ran(module, inputs, output):
        seen.setdefault("layer", (torch.is_autocast_enabled("cpu"), output.dtype, next(module.parameters()).dtype))

    load = prefopt.pipeline.load_model

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        seen["config"] = model.config
        model.model.layers[0].register_forward_hook(layer_ran)
        return model

    monkeypatch.setattr(prefopt.scoring, "token_logps", recording)
    # the training step's head, its gradient formed in forward (None where that path does not apply)
    monkeypatch.setattr(prefopt.scoring, "ahead_scores", lambda *a, **k: recording(*a, scorer=ahead_scores, **k))
    monkeypatch.setattr(prefopt.pipeline, "load_model", loading)
    return seen


def train_one_step(path, root, out, extra: list[str], seen: dict) -> dict:
    """`prefopt train` of the config at `path` with `extra`: one step, on the tiny model and data of
    the workspace at `root`, into `out`. Returns what `seen` recorded, the logged loss and the dtypes
    of the saved weights."""
    seen.clear()
    code = main(["train", str(path), "--model_name_or_path", str(root / "model"),
                 "--dataset_mixer", json.dumps({str(root / "data"): 1.0}), "--dataset_splits", "[train, test]",
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--logging_steps", "1", "--use_cpu", "true", "--output_dir", str(out), *extra])
    assert code == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {f.get_slice(key).get_dtype() for key in f.keys()}
    return dict(seen, loss=next(line["loss"] for line in logged if "loss" in line), saved=saved)


@pytest.mark.parametrize("name", ["simpo-llama3-8b-instruct", "cpo_simpo-phi3-mini"])
def test_a_shipped_config_trains_in_bf16_close_to_fp32(name, local, tmp_path, monkeypatch):  # noqa: F811
    """The CLI as shipped (bf16 weights, CPU autocast: `--use_cpu` makes a GPU machine run the same)
    and with `--dtype float32 --bf16 false`, one step on the same tiny model and data: what ran is
    asserted, and the logged loss differs from fp32's only as much as bf16 rounding of the hidden
    states and the head explains."""
    path = next(p for p in CONFIGS if p.stem == name)
    cfg = load_config(str(path))
    assert cfg.model.dtype == "bfloat16" and cfg.training.bf16 and cfg.objective.loss_type == "sigmoid"
    seen = record_the_step(monkeypatch)
    runs = {}
    for run, extra in (("bf16", []), ("fp32", ["--dtype", "float32", "--bf16", "false"])):
        runs[run] = train_one_step(path, local, tmp_path / run, extra, seen)
    bf16, fp32 = runs["bf16"], runs["fp32"]
    # what ran: autocast around bf16 layers with bf16 weights and head, saved in bf16; fp32 throughout
    assert bf16["layer"] == (True, torch.bfloat16, torch.bfloat16) and bf16["head_dtype"] == torch.bfloat16
    assert fp32["layer"] == (False, torch.float32, torch.float32) and fp32["head_dtype"] == torch.float32
    assert bf16["saved"] == {"BF16"} and fp32["saved"] == {"F32"}
    assert torch.equal(bf16["target"], fp32["target"])  # the same tokens, in the same order
    assert math.isfinite(bf16["loss"])

    dh = (bf16["h"] - fp32["h"]).abs()
    assert dh.max() > 0
    assert_within(dh.max(), hidden_budget(fp32["config"]) * fp32["h"].abs().max(), "final hidden states")
    # each log-prob within what those hidden states explain through the head, whose weights and
    # logits the bf16 run rounds
    z, e = logit_error(fp32["h"], fp32["weight"], dh=dh, weight_rounded=True)
    bound = logp_error(z, e, fp32["target"])
    delta = bf16["logps"].detach().double() - fp32["logps"].detach().double()
    assert_within(delta.abs(), SAFETY * bound, "token log-probs")
    sensitivity = fp32["logps"].grad.double()
    assert_within(abs(bf16["loss"] - fp32["loss"]), SAFETY * (sensitivity.abs() * bound).sum(), "first-step loss")
    # Sharper: both runs compose the loss in fp32 from their token log-probs, so its difference is
    # Σ_t ∂loss/∂log p_t · Δ_t up to the second-order term. Per pair −log σ(x), −log σ'' ≤ 1/4, with
    # x = β(mean Δ chosen − mean Δ rejected) moved by ≤ 2β·max|Δ|; the NLL term is linear:
    # remainder ≤ ½·¼·(2β·max|Δ|)². Plus each run's fp32 round-off: its per-sequence sums (n·EPS of
    # the summed |log p|, n ≥ a sequence's tokens), through the sensitivity, and a few roundings of the
    # loss itself.
    beta, n = cfg.objective.beta, len(bf16["target"])
    remainder = (beta * delta.abs().max()) ** 2 / 2
    fp32_sums = 2 * n * EPS * (sensitivity.abs() * fp32["logps"].detach().double().abs()).sum()
    fp32_sums = fp32_sums + 8 * EPS * abs(fp32["loss"])
    first_order = (sensitivity * delta).sum()
    assert_within(abs(bf16["loss"] - fp32["loss"] - first_order), remainder + fp32_sums, "loss beyond first order")
