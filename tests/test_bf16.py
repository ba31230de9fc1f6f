"""bf16, as every shipped config trains (`dtype: bfloat16` weights, `bf16: true`, which on a machine
without a GPU is CPU autocast): the LM head against fp32 or float64 references, each tolerance
derived from bf16's precision where it is used. The layouts against padded are test_bf16_layouts.py;
one real training step of a shipped config, test_bf16_shipped.py.

What runs in bf16 during training: accelerate wraps the model's forward in autocast and hands back
fp32 outputs; the LM head then runs outside autocast, in its weights' dtype (`scored_hidden`), so
with bf16 weights its logits are one bf16 matmul and everything after them is fp32.
"""

import pytest
import torch
import torch.nn.functional as F

from bf16_helpers import EPS, SAFETY, U, assert_within, logit_error, logp_error
from prefopt.logprobs import token_logps


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


def run_head(head, hidden, target, upstream, chunk, fused, autocast, keep=0):
    """token_logps' values and gradients. Under autocast only the forward is inside the region and
    backward() is called outside it, as in training."""
    head.zero_grad()
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tok = token_logps(hidden, torch.arange(N), target, head, chunk=chunk, fused=fused, keep=keep)
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
# the fused head recomputing every row's softmax in backward, keeping some rows' (40 of 97), all of
# them; the checkpointed module
@pytest.mark.parametrize("fused, keep", [(True, 0), (True, 40), (True, N), (False, 0)])
@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_head_under_bf16_is_within_its_rounding_bound(weights, fused, keep, with_bias, chunk, reference_dtype):
    """bf16 weights (the shipped configs), or fp32 weights under autocast (a library caller's
    autocast region), against full logits from the same bf16-rounded inputs; values and gradients."""
    head, hidden, target, upstream = head_and_hidden(weights, with_bias)
    ours = run_head(head, hidden, target, upstream, chunk, fused, autocast=weights == "float32", keep=keep)
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


@pytest.mark.parametrize("keep", [0, 40])
@pytest.mark.parametrize("chunk", [7, N])
def test_fused_logit_gradient_sums_to_zero_under_autocast(chunk, keep):
    """log p is unchanged by adding one constant to every logit, so the bias gradient sums to zero
    over the vocabulary. The fused backward once recomputed the logits in fp32 (autocast is off where
    backward() runs) and took exp(z − lse) against the forward's bf16-logit log-sum-exps: a softmax
    summing to exp(lse₃₂ − lse₁₆) ≠ 1, a bias of U·|z| size in every row's gradient: this sum was
    −0.082 then, against 0.0065 allowed here; it is now 2e-7.

    In fp32 the sum is off only by round-off: per row, lse's V-term sum and rounding and each exp's
    (≤ EPS·(V + |lse| + max|z − lse| + 4)), and the N rows summed into each ∂/∂b_v (N·EPS·Σ|G|).
    """
    head, hidden, target, upstream = head_and_hidden("float32", with_bias=True)
    ours = run_head(head, hidden, target, upstream, chunk, fused=True, autocast=True, keep=keep)
    h, weight, bias = rounded_inputs(head, hidden)
    z = F.linear(h, weight, bias)
    lse = torch.logsumexp(z, -1)
    G = upstream.double()[:, None] * (F.one_hot(target, V).double() - torch.softmax(z, -1))
    per_row = (V + lse.abs() + (z - lse[:, None]).abs().amax(-1) + 4) * EPS * upstream.double().abs()
    bound = per_row.sum() + N * EPS * G.abs().sum()
    assert_within(ours["bias"].double().sum().abs(), SAFETY * bound, "sum of the bias gradient")
