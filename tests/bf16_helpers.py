"""Helpers of the bf16 tests (test_bf16*.py): bf16's and fp32's unit round-offs, the first-order
error bounds of one LM head's logits and log-probs, the budget of a bf16 forward's final hidden
states, and the check of an error against its bound."""

import math

import torch
import torch.nn.functional as F

U = 2.0**-8  # bf16's unit round-off: 8 significand bits, round to nearest even
EPS = 2.0**-24  # fp32's
# On first-order bounds. The neglected terms are those of exp(x) − 1 − x with x the perturbation of a
# log-softmax, x ≤ 2U·max|z| ≈ 0.16 for test_bf16.py's head: under 10 % of the bound. The factor covers them.
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


def hidden_budget(config) -> float:
    """Allowed |Δh| / max|h| of the final hidden states of a bf16 forward: one U for the final
    norm's rounding and, per layer, one for each of the attention output, the MLP output and the two
    residual additions. A budget rather than a bound (it ignores amplification inside the layers),
    checked against measurement: 3.3 U at most, Gemma-2 (two more norms per layer), of 9 U here."""
    return (1 + 4 * config.num_hidden_layers) * U
