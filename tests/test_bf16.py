"""bf16, as every shipped config trains (`dtype: bfloat16` weights, `bf16: true`, which on a machine
without a GPU is CPU autocast): the LM head, the layouts and one real training step against fp32 or
float64 references, each tolerance derived from bf16's precision where it is used.

What runs in bf16 during training: accelerate wraps the model's forward in autocast and hands back
fp32 outputs; the LM head then runs outside autocast, in its weights' dtype (`scored_hidden`), so
with bf16 weights its logits are one bf16 matmul and everything after them is fp32.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import prefopt.pipeline
import prefopt.scoring
from helpers import make_trainer, random_pairs
from prefopt.cli import main
from prefopt.attention import install_segmented_sdpa, model_inputs
from prefopt.collate import collator_for
from prefopt.config import build_config, load_config
from prefopt.logprobs import head_transform, per_sequence, token_logps
from prefopt.tiny import tiny_model
from test_layouts import ARCH_ATTN
from test_shipped_configs import CONFIGS, local  # noqa: F401 (the fixture: a tiny local model and data)

U = 2.0**-8  # bf16's unit round-off: 8 significand bits, round to nearest even
EPS = 2.0**-24  # fp32's
# On first-order bounds. The neglected terms are those of exp(x) − 1 − x with x the perturbation of a
# log-softmax, x ≤ 2U·max|z| ≈ 0.16 for the head below: under 10 % of the bound. The factor covers them.
SAFETY = 2


def assert_within(error, bound, what: str):
    """error ≤ bound, elementwise; the message gives the worst error as a multiple of its bound."""
    error, bound = torch.as_tensor(error, dtype=torch.float64), torch.as_tensor(bound, dtype=torch.float64)
    ratio = torch.where(error == 0, 0.0, error / bound).max().item()
    assert ratio <= 1, f"{what}: {ratio:.3g} times its bf16 bound"


# -- error bounds for one LM head ----------------------------------------------------------------


def logit_error(h, weight, bias=None, dh=None, logits_rounded=True, weight_rounded=False):
    """z = h·Wᵀ + b in float64, and a bound [N, V] on the error of the z a bf16 run computes.

    A CPU bf16 matmul multiplies bf16 numbers exactly in fp32, sums them in fp32 (≤ H·EPS·Σ|h||W|)
    and rounds the result, bias included, once to bf16 (≤ U·|z|); measured: the CPU kernels reach
    0.99 of this and never exceed it. A run whose hidden states are off by `dh` adds |dh|·|W|;
    weights rounded to bf16 from the reference's add U·Σ|h||W|.
    """
    z = F.linear(h, weight, bias)
    scale = h.abs() @ weight.abs().T + (bias.abs() if bias is not None else 0)
    e = h.shape[1] * EPS * scale
    if logits_rounded:
        e = e + U * z.abs()
    if weight_rounded:
        e = e + U * scale
    if dh is not None:
        e = e + dh.abs() @ weight.abs().T
    return z, e


def logp_error(z, e, target):
    """A bound [N] on the error of log p(t) = z_t − logsumexp(z) when each z_v is off by ≤ e_v.

    To first order the log-sum-exp moves by Σ_v p_v·e_v; it is summed in fp32 over V terms (V·EPS)
    and rounded (EPS·|lse| ≤ EPS·(max|z| + log V)).
    """
    p = torch.softmax(z, -1)
    V = z.shape[1]
    lse_fp32 = (V + math.log(V) + z.abs().amax(-1)) * EPS
    return e.gather(1, target[:, None]).squeeze(1) + (p * e).sum(-1) + lse_fp32


def head_bounds(h, weight, bias, target, g, fused: bool, weights_bf16: bool, chunks: int) -> dict:
    """Bounds on |computed − exact| for what `token_logps` returns and its gradients, the exact values
    being those of the same (bf16-rounded) inputs. Everything [N]/[N, H]/[V, H]/[V] float64.

    Forward: `logp_error` of `logit_error`. Backward: both paths form the logits' gradient
    G = g·(onehot − exp(z̃ − lse)) from the same bf16 logits z̃ as the forward, so each entry of the
    softmax is off by ≤ p_v·r_v, r_v = e_v + Σ_w p_w e_w (first order). Then:

    - ∂/∂h = bf16(bf16(G)·W): G rounded to bf16 (U·|G|·|W|), fp32 sums over V, the result rounded.
    - ∂/∂W = Gᵀ·h. Fused: summed over all N rows in fp32, rounded once if the weight is bf16 (under
      autocast from the unrounded fp32 h: U·|G|ᵀ·|h| from the reference's rounded one). Module
      path (autograd's bf16 linear): G rounded first, each chunk's result rounded, and the chunks'
      results added in bf16, one more rounding per chunk: in a bf16 weight's `.grad`, and under
      autocast in the gradient of the one bf16 copy of the weight that autocast caches for all chunks.
    - ∂/∂b: the same with h = 1.
    """
    N, V = g.shape[0], weight.shape[0]
    z, e = logit_error(h, weight, bias)
    p = torch.softmax(z, -1)
    r = e + (p * e).sum(-1, keepdim=True)
    G = g[:, None] * (F.one_hot(target, V).double() - p)
    dG = g.abs()[:, None] * p * r
    absG, absW = G.abs(), weight.abs()
    out = {"logps": logp_error(z, e, target),
           "h": dG @ absW + U * (absG @ absW) + U * (G @ weight).abs() + V * EPS * (absG @ absW)}
    inputs = [("weight", h)]  # ∂/∂W = Gᵀ·h, ∂/∂b = Gᵀ·1
    if bias is not None:
        inputs.append(("bias", torch.ones(N, 1, dtype=h.dtype)))
    for name, x in inputs:
        exact, through = G.T @ x, absG.T @ x.abs()
        bound = dG.T @ x.abs() + N * EPS * through
        if not fused:
            # G rounded; each chunk's result rounded (their sizes add up to ≤ |G|ᵀ·|x|); the chunks'
            # results added in bf16
            bound = bound + (1 + chunks) * U * through
        elif weights_bf16:
            bound = bound + U * exact.abs()  # rounded once, at the end
        elif name == "weight":
            bound = bound + U * through  # under autocast the fp32 h meets G, not h's bf16 rounding
        out[name] = bound.squeeze(1)
    # mean over V of the logits: the module path averages the bf16 logits in fp32; the fused path
    # forms h·mean(W), in fp32 without autocast, and under autocast from bf16 h and mean(W) (their
    # roundings, U·|h|·mean|W| each, that of W inside its mean too) rounded once more
    mean_scale = h.abs() @ absW.mean(0) + (bias.abs().mean() if bias is not None else 0)
    if not fused:
        out["means"] = e.mean(-1) + V * EPS * z.abs().mean(-1)
    elif weights_bf16:
        out["means"] = (h.shape[1] + V) * EPS * mean_scale
    else:
        out["means"] = 3 * U * mean_scale + (h.shape[1] + V) * EPS * mean_scale
    return out


# -- the LM head ---------------------------------------------------------------------------------

V, H, N = 503, 64, 97


def head_and_hidden(weights: str, with_bias: bool, seed: int = 0):
    """A head whose logits have std 4 and reach about ±20, a trained LM's range (a tiny random model's
    logits are near zero, which would hide the rounding of large ones), and hidden states."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=with_bias)
    with torch.no_grad():
        head.weight.normal_(0, 4 / H**0.5)
        if with_bias:
            head.bias.normal_()
    hidden = torch.randn(1, N, H)
    if weights == "bfloat16":
        head, hidden = head.bfloat16(), hidden.bfloat16()
    target = torch.randint(0, V, (N,))
    upstream = torch.randn(N)  # an arbitrary incoming gradient
    return head, hidden.requires_grad_(), target, upstream


def run_head(head, hidden, target, upstream, chunk, fused, autocast):
    """token_logps' values and gradients. Under autocast only the forward is inside the region and
    backward() is called outside it, as in training."""
    head.zero_grad()
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tok = token_logps(hidden, torch.arange(N), target, head, chunk=chunk, fused=fused)
    (tok.logps * upstream).sum().backward()
    return {"logps": tok.logps.detach(), "means": tok.mean_logits, "h": hidden.grad[0],
            "weight": head.weight.grad, "bias": head.bias.grad if head.bias is not None else None}


def rounded_inputs(head, hidden):
    """What the head's matmuls see in float64: the inputs rounded to bf16 (exact for bf16 ones)."""
    as64 = lambda t: t.detach().bfloat16().double() if t is not None else None  # noqa: E731
    return as64(hidden[0]), as64(head.weight), as64(head.bias)


def full_logits_reference(h, weight, bias, target, upstream, dtype):
    """log_softmax of the whole [N, V] logits in `dtype`, with autograd's gradients."""
    h, weight = h.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    bias = bias.to(dtype).requires_grad_() if bias is not None else None
    z = F.linear(h, weight, bias)
    logps = torch.log_softmax(z, -1).gather(1, target[:, None]).squeeze(1)
    (logps * upstream.to(dtype)).sum().backward()
    return {"logps": logps.detach(), "means": z.detach().mean(-1), "h": h.grad, "weight": weight.grad,
            "bias": bias.grad if bias is not None else None}


@pytest.mark.parametrize("reference_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 64, N])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_head_under_bf16_is_within_its_rounding_bound(weights, fused, with_bias, chunk, reference_dtype):
    """bf16 weights (the shipped configs), or fp32 weights under autocast (a library caller's
    autocast region), against full logits from the same bf16-rounded inputs; values and gradients."""
    head, hidden, target, upstream = head_and_hidden(weights, with_bias)
    ours = run_head(head, hidden, target, upstream, chunk, fused, autocast=weights == "float32")
    h, weight, bias = rounded_inputs(head, hidden)
    reference = full_logits_reference(h, weight, bias, target, upstream, reference_dtype)
    bounds = head_bounds(h, weight, bias, target, upstream.double(), fused, weights == "bfloat16", -(-N // chunk))
    for name, bound in bounds.items():
        error = (ours[name].double() - reference[name].double()).abs()
        assert_within(error, SAFETY * bound, f"{name}")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_chunked_head_equals_unchunked_within_one_rounding_flip(weights, fused):
    """Chunking changes which rows share a matmul, nothing else in a row's arithmetic. A kernel may
    still sum a row's H products in another order for another row count: fp32 sums that differ by
    ≤ 2H·EPS·Σ|h||W|, which can flip a logit's bf16 rounding by one spacing (≤ 2U·|z|). So each logit
    may differ by twice its `logit_error`. (With this machine's AVX-512, AVX2 and default kernels
    the log-probs were bit-identical.)"""
    head, hidden, target, upstream = head_and_hidden(weights, with_bias=True)
    autocast = weights == "float32"
    whole = run_head(head, hidden, target, upstream, N, fused, autocast)["logps"]
    h, weight, bias = rounded_inputs(head, hidden)
    z, e = logit_error(h, weight, bias)
    for chunk in (1, 7, 64):
        chunked = run_head(head, hidden, target, upstream, chunk, fused, autocast)["logps"]
        assert_within((chunked.double() - whole.double()).abs(), logp_error(z, 2 * e, target), f"chunk {chunk}")


@pytest.mark.parametrize("chunk", [7, N])
def test_fused_logit_gradient_sums_to_zero_under_autocast(chunk):
    """log p is unchanged by adding one constant to every logit, so the bias gradient sums to zero
    over the vocabulary. The fused backward once recomputed the logits in fp32 (autocast is off where
    backward() runs) and took exp(z − lse) against the forward's bf16-logit log-sum-exps: a softmax
    summing to exp(lse₃₂ − lse₁₆) ≠ 1, a bias of U·|z| size in every row's gradient: this sum was
    −0.082 then, against 0.0065 allowed here; it is now 2e-7.

    In fp32 the sum is off only by round-off: per row, lse's V-term sum and rounding and each exp's
    (≤ EPS·(V + |lse| + max|z − lse| + 4)), and the N rows summed into each ∂/∂b_v (N·EPS·Σ|G|).
    """
    head, hidden, target, upstream = head_and_hidden("float32", with_bias=True)
    ours = run_head(head, hidden, target, upstream, chunk, fused=True, autocast=True)
    h, weight, bias = rounded_inputs(head, hidden)
    z = F.linear(h, weight, bias)
    lse = torch.logsumexp(z, -1)
    G = upstream.double()[:, None] * (F.one_hot(target, V).double() - torch.softmax(z, -1))
    per_row = (V + lse.abs() + (z - lse[:, None]).abs().amax(-1) + 4) * EPS * upstream.double().abs()
    bound = per_row.sum() + N * EPS * G.abs().sum()
    assert_within(ours["bias"].double().sum().abs(), SAFETY * bound, "sum of the bias gradient")


# -- the layouts against padded ------------------------------------------------------------------
#
# Here the reference is the fp32 forward of the same weights (a bf16 model upcast exactly), and the
# bf16 layouts do different arithmetic from padded: other attention shapes and reduction orders, so
# other roundings. No a-priori bound on a transformer's bf16 error is tight enough to catch a wrong
# mask, so the criterion is relative: each layout's bf16 result is as close to the fp32 truth as
# padded's own bf16 result, within a factor PADDED_FACTOR. Two correct bf16 evaluations of one
# quantity have errors of one distribution; the factor covers the spread of their maxima (worst ratio
# seen: 1.1 for sequence log-probs, 1.53 for a parameter's gradient, over 4 seeds × these 7 models ×
# 2 methods × 2 weight dtypes), while a mask that lets rejected tokens see chosen ones puts sequence
# log-probs 16–130 times padded's error off (asserted below). Padded's own error is anchored
# separately: the final hidden states within a budget of bf16 roundings, and each log-prob within
# what those hidden states explain through the head.
PADDED_FACTOR = 2


def hidden_budget(config) -> float:
    """Allowed |Δh| / max|h| of the final hidden states of a bf16 forward: one U for the final
    norm's rounding and, per layer, one for each of the attention output, the MLP output and the two
    residual additions. A budget rather than a bound (it ignores amplification inside the layers),
    checked against measurement: 3.3 U at most, Gemma-2 (two more norms per layer), of 9 U here."""
    return (1 + 4 * config.num_hidden_layers) * U


def bf16_model(arch: str, attn: str, weights: str):
    """The model to run under autocast, and its fp32 reference (the same weights, exactly)."""
    model = tiny_model(arch, 101, attn_implementation=attn)
    if weights == "bfloat16":
        model = model.bfloat16()
    return model, copy.deepcopy(model).float()


def forward_scores(model, batch, autocast: bool):
    """Per-token log-probs and final hidden states at the scored positions, as training computes
    them: the forward under CPU autocast, its outputs in fp32, the head outside autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"], **model_inputs(batch, model.config, model.dtype),
                    output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1].float()
    tok = token_logps(hidden, batch["score_index"], batch["score_target"], model.get_output_embeddings(),
                      head_transform(model.config), 64)
    return tok.logps.detach(), hidden.reshape(-1, hidden.shape[-1])[batch["score_index"]].detach()


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_sequence_logps_under_bf16_are_as_close_to_fp32_as_padded(arch, attn, weights, tmp_path):
    install_segmented_sdpa()  # as the pipeline does for packed rows on SDPA
    pairs = random_pairs(6, seed=4, max_prompt=14, max_completion=14)  # longer than the sliding window
    model, reference_model = bf16_model(arch, attn, weights)
    cfg = build_config({"method": "orpo", "output_dir": str(tmp_path)})  # prompt tokens scored too

    def sequences(logps, batch):
        return per_sequence(logps.double(), batch["score_seq"], torch.ones_like(batch["score_is_completion"]), 12)[0]

    padded = collator_for(cfg, 0, "padded")(pairs)
    true_logps, true_h = forward_scores(reference_model, padded, autocast=False)
    truth = sequences(true_logps, padded)
    logps, h = forward_scores(model, padded, autocast=True)
    dh = (h - true_h).abs()
    assert dh.max() > 0, "the bf16 forward ran in fp32"
    assert_within(dh.max(), hidden_budget(model.config) * true_h.abs().max(), "padded's final hidden states")
    # the head sees these hidden states; with bf16 weights it rounds its logits too (for Gemma-2's
    # soft-cap, |tanh'| ≤ 1: an error in z is not enlarged, and the softmax is of the capped logits)
    head = reference_model.get_output_embeddings().weight.double()
    z, e = logit_error(true_h.double(), head, dh=dh.double(), logits_rounded=weights == "bfloat16")
    transform = head_transform(model.config)
    if transform is not None:
        z = transform(z)
    bound = logp_error(z, e, padded["score_target"])
    assert_within((logps.double() - true_logps.double()).abs(), SAFETY * bound, "padded's token log-probs")
    padded_error = (sequences(logps, padded) - truth).abs().max()

    for layout in ("shared", "packed"):
        batch = collator_for(cfg, 0, layout, attn)(pairs)
        error = (sequences(forward_scores(model, batch, autocast=True)[0], batch) - truth).abs().max()
        assert_within(error, PADDED_FACTOR * padded_error, f"{layout}: sequence log-probs")
        # not vacuous: with the rejected branch allowed to see the chosen one, the criterion fails
        batch["branch_ids"][batch["branch_ids"] == 2] = 1
        wrong = (sequences(forward_scores(model, batch, autocast=True)[0], batch) - truth).abs().max()
        assert wrong > PADDED_FACTOR * padded_error, f"{layout}: a wrong mask passes"


def training_step(model, layout, method, pairs, tmp_path, bf16: bool, monkeypatch):
    """compute_loss + backward as the Trainer runs them (with bf16, accelerate's autocast wrapper
    around the forward). Returns the loss, the token log-probs in sequence order with the loss's
    gradient for each, and every parameter's gradient, all float64."""
    trainer = make_trainer(model, {"method": method}, tmp_path / f"{layout}-{bf16}", layout=layout, bf16=bf16)
    if bf16:
        trainer.accelerator.prepare_model(model)
    seen = {}

    def recording(*args, **kwargs):
        seen["tok"] = tok = token_logps(*args, **kwargs)
        tok.logps.retain_grad()
        return tok

    monkeypatch.setattr(prefopt.scoring, "token_logps", recording)
    batch = trainer.data_collator(pairs)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    order = torch.sort(batch["score_seq"], stable=True).indices  # each sequence's tokens in order, any layout
    logps = seen["tok"].logps
    return (loss.item(), logps.detach()[order].double(), logps.grad[order].double(),
            {name: p.grad.double() for name, p in model.named_parameters()})


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
@pytest.mark.parametrize("method", ["cpo_simpo", "orpo"])
def test_loss_and_gradients_under_bf16_are_as_close_to_fp32_as_padded(arch, attn, method, weights, tmp_path,
                                                                      monkeypatch):
    pairs = random_pairs(5, seed=8, max_prompt=12, max_completion=12)
    model, reference_model = bf16_model(arch, attn, weights)

    def step(m, layout, bf16):
        return training_step(m, layout, method, pairs, tmp_path, bf16, monkeypatch)

    true_loss, true_logps, sensitivity, true_grads = step(reference_model, "padded", False)
    _, padded_logps, _, padded_grads = step(copy.deepcopy(model), "padded", True)
    token_error = (padded_logps - true_logps).abs().max()
    grad_error = {name: (g - true_grads[name]).norm() for name, g in padded_grads.items()}
    assert token_error > 0 and min(grad_error.values()) > 0, "the bf16 step ran in fp32"
    for layout in ("shared", "packed"):
        loss, logps, _, grads = step(copy.deepcopy(model), layout, True)
        assert_within((logps - true_logps).abs().max(), PADDED_FACTOR * token_error, f"{layout}: token log-probs")
        # the loss is a function of the token log-probs alone: to first order it moves by
        # Σ_t |∂loss/∂log p_t| · |Δ log p_t|, here with the tolerated token error
        assert_within(abs(loss - true_loss), sensitivity.abs().sum() * PADDED_FACTOR * token_error, f"{layout}: loss")
        for name, g in grads.items():
            assert_within((g - true_grads[name]).norm(), PADDED_FACTOR * grad_error[name], f"{layout}: grad {name}")


# -- one real training step ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simpo-llama3-8b-instruct", "cpo_simpo-phi3-mini"])
def test_a_shipped_config_trains_in_bf16_close_to_fp32(name, local, tmp_path, monkeypatch):  # noqa: F811
    """The CLI as shipped (bf16 weights, CPU autocast: `--use_cpu` makes a GPU machine run the same)
    and with `--dtype float32 --bf16 false`, one step on the same tiny model and data: what ran is
    asserted, and the logged loss differs from fp32's only as much as bf16 rounding of the hidden
    states and the head explains."""
    path = next(p for p in CONFIGS if p.stem == name)
    cfg = load_config(str(path))
    assert cfg.model.dtype == "bfloat16" and cfg.training.bf16 and cfg.objective.loss_type == "sigmoid"
    seen = {}

    def recording(hidden, index, target, head, *args, **kwargs):
        tok = token_logps(hidden, index, target, head, *args, **kwargs)
        if tok.logps.requires_grad and "logps" not in seen:  # the training step's, not evaluation's
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
    monkeypatch.setattr(prefopt.pipeline, "load_model", loading)
    runs = {}
    for run, extra in (("bf16", []), ("fp32", ["--dtype", "float32", "--bf16", "false"])):
        seen.clear()
        out = tmp_path / run
        code = main(["train", str(path), "--model_name_or_path", str(local / "model"),
                     "--dataset_mixer", json.dumps({str(local / "data"): 1.0}), "--dataset_splits", "[train, test]",
                     "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                     "--logging_steps", "1", "--use_cpu", "true", "--output_dir", str(out), *extra])
        assert code == 0
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            saved = {f.get_slice(key).get_dtype() for key in f.keys()}
        runs[run] = dict(seen, loss=next(line["loss"] for line in logged if "loss" in line), saved=saved)
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
