"""The fused head's gradient formed in forward, a group of whole pairs at a time.

Every objective prefopt trains is a sum over pairs plus terms linear in the log-probs (the NLL):
once a pair's rows are scored, the loss's derivative for those rows, g = ∂L/∂log p, is known, so
the gradient of h, W and b for them can be formed while their softmax is still in memory —

    ∂/∂h = g ⊙ W[t] − (g/s) ⊙ (e W)        ∂/∂W = Σ g h ⊗ onehot(t) − eᵀ ((g/s) ⊙ h)

(e = exp(z − max z), s its row sum: `logprobs._FusedHeadLogps`) — and the softmax dropped. Three
matmuls per row, as when the softmax is kept to backward, in the memory of one group (whole pairs,
at least one chunk's rows) instead of the micro-batch's; nothing is recomputed.

The g used is a prediction: `Ahead.d_logps` is the step's own loss (`step.loss`, the one place it
is composed) differentiated on a detached copy of the log-probs. Backward receives the real
∂/∂log p, which differs from it by the factor the caller applied to the loss (processes, gradient
accumulation, a loss scaler) — the head's gradients are linear in g, so backward multiplies by that
factor. If the real gradient is not that multiple (a term the prediction did not see), backward
says so once and recomputes the exact gradient from the saved log-sum-exps, chunk by chunk.
"""

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .logprobs import (TokenScores, _exp_logits, _FusedHeadLogps, _gather, _HeadGrads, _logits_into, _mean_logits,
                       autocast_state, replay_autocast, scored_hidden)

Tensor = torch.Tensor
# |real − c·predicted| ≤ MATCH·|real| + FLOOR·max|real| element by element: the prediction runs the
# loss's own ops on the same values, so the two differ by the rounding of the factor c through the
# loss's few ops (a few fp32 ulps, ~1e-7 each, relative to an element, or to the terms of both signs
# an element sums: the floor); a term the prediction missed is far larger or below fp32's reach
MATCH, FLOOR = 1e-5, 1e-6
# a factor this close to 1 is 1 (the rounding of the loss's ops, not a scale): the gradient is used as formed
ONE = 1e-6
_said = False


@dataclass(frozen=True)
class Ahead:
    """What the fused head needs to form its gradient in forward."""

    pair: Tensor  # [N] the pair each scored row belongs to (its chosen or rejected sequence, or its prompt)
    d_logps: Callable[[Tensor], Tensor]  # [N] log-probs → [N] ∂L/∂log p; exact for the rows of pairs all scored


class Workspace:
    """The [rows, V] fp32 buffer the groups' logits go through. On CPU it is kept from step to step:
    a fresh one faults its pages in as the first matmul writes them (at V 32k, 1,194 rows into a
    fresh 1,871-row buffer ran at 63 GFLOP/s, into a used one at 170); it grows to the largest group
    seen, at most `logprob_keep_mb`, and `release` hands it back. Elsewhere (CUDA's caching
    allocator reuses freed blocks itself) it is dropped when the forward is done."""

    def __init__(self):
        self.buffer: Tensor | None = None

    def take(self, rows: int, V: int, device) -> Tensor:
        b = self.buffer
        if b is None or b.device != torch.device(device) or b.numel() < rows * V:
            self.buffer = None  # the old one goes before the new one is allocated
            self.buffer = b = torch.empty(rows * V, dtype=torch.float32, device=device)
        return b[: rows * V].view(rows, V)

    def done(self):
        """The forward's groups are scored: off CPU, the buffer goes."""
        if self.buffer is not None and self.buffer.device.type != "cpu":
            self.buffer = None

    def release(self):
        self.buffer = None


def plan(pair: Tensor, chunk: int, budget: int) -> tuple[Tensor, list[tuple[int, int]]] | None:
    """Rows ordered pair by pair and cut into groups of whole pairs of at most max(chunk, the largest
    pair) rows: (order, [(start, stop)] into it); None when the largest pair exceeds `budget` rows."""
    order = torch.argsort(pair, stable=True)
    sizes = torch.bincount(pair).tolist()
    cap = max(chunk, max(sizes, default=0))
    if cap > budget:
        return None
    groups, start, stop = [], 0, 0
    for n in sizes:
        if stop + n - start > cap:
            groups.append((start, stop))
            start = stop
        stop += n
    if stop > start:
        groups.append((start, stop))
    return order, groups


class _FusedHeadAhead(torch.autograd.Function):
    """log p(target) of N rows as `_FusedHeadLogps`, with the head's gradient formed in forward
    (see the module docstring); backward scales it, or recomputes it when the prediction was off."""

    @staticmethod
    def forward(ctx, h: Tensor, target: Tensor, weight: Tensor, bias: Tensor | None, chunk: int, gather,
                order: Tensor, groups: list, ahead: Ahead, workspace: Workspace) -> Tensor:
        N = h.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        # the log-probs scored so far, in row order; a pair not yet scored reads −1 (any finite value)
        filled = torch.full((N,), -1.0, dtype=torch.float32, device=h.device)
        g = torch.zeros(N, dtype=torch.float32, device=h.device)
        hp, tp = h[order], target[order]
        with gather():  # a ZeRO-3-partitioned weight has its shape and values only inside
            grads = _HeadGrads(ctx.needs_input_grad, hp, weight, bias)
            buffer = workspace.take(max(b - a for a, b in groups), weight.shape[0], h.device)
            for a, b in groups:
                rows, where = slice(a, b), order[a:b]
                e = _logits_into(hp[rows], weight, bias, buffer[: b - a])
                lp, lse[where], sums = _exp_logits(e, tp[rows])
                logp[where] = filled[where] = lp
                g[where] = g_rows = ahead.d_logps(filled)[where]
                grads.sub_softmax(rows, e, g_rows / sums)
            grads.add_target(tp, g[order])
            del e, buffer
            workspace.done()
        ctx.save_for_backward(h, target, lse, g)
        ctx.grads, ctx.order, ctx.weight, ctx.bias, ctx.chunk, ctx.gather = grads, order, weight, bias, chunk, gather
        ctx.recomputed = None
        ctx.autocast = autocast_state(h)
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        h, target, lse, g = ctx.saved_tensors
        real = grad_logp.float()
        grads, ctx.grads = ctx.grads, None  # autograd then holds W's gradient alone: it is taken, not copied
        factor = _factor(real, g) if grads is not None else None  # None: a second backward through the graph
        if factor is not None:
            grad_h, *rest = grads.result(factor)
            del grads
            if grad_h is not None:  # back to row order
                grad_h = torch.empty_like(grad_h).index_copy_(0, ctx.order, grad_h)
            return (grad_h, *rest)
        del grads
        if ctx.recomputed is None and bool(torch.isfinite(real).all()):  # a NaN or inf stops the step anyway
            _say_recomputed()
        ctx.recomputed = True
        with ctx.gather(), replay_autocast(ctx.autocast):  # every row recomputed, as `_FusedHeadLogps` with none kept
            ctx.spare = torch.empty(min(ctx.chunk, h.shape[0]), ctx.weight.shape[0], dtype=torch.float32,
                                    device=h.device)
            kept = h.new_empty(0, ctx.weight.shape[0], dtype=torch.float32)
            return _FusedHeadLogps._backward(ctx, h, target, ctx.weight, ctx.bias, lse, kept, real)


def _factor(real: Tensor, predicted: Tensor) -> Tensor | float | None:
    """c with real = c · predicted element by element (to MATCH of each element, with a floor of
    FLOOR of the largest, for elements that are sums of terms of both signs), or None."""
    if predicted.numel() == 0:
        return 1.0
    top = int(predicted.abs().argmax())
    if predicted[top] == 0:
        return 0.0 if not bool(real.any()) else None
    c = real[top] / predicted[top]
    bound = MATCH * real.abs() + FLOOR * real.abs().max()
    if bool(((real - c * predicted).abs() <= bound).all()):
        return 1.0 if bool((c - 1).abs() <= ONE) else c
    return None


def _say_recomputed():
    global _said
    if not _said:
        _said = True
        warnings.warn("prefopt: the LM head's gradient formed in forward did not match the loss's (a term the "
                      "prediction did not see); this step's head gradient was recomputed exactly instead, at the "
                      "cost of one more head matmul. Please report it, with the config; `logprob_keep_mb: 0` "
                      "trains without forming it in forward (the least memory, one more head matmul every step).",
                      stacklevel=2)


def ahead_scores(hidden: Tensor, score_index: Tensor, target: Tensor, head: torch.nn.Module, chunk: int, keep: int,
                 ahead: Ahead, workspace: Workspace | None = None) -> TokenScores | None:
    """`logprobs.token_logps` through a plain Linear head with the head's gradient formed in forward;
    None where that does not apply (no gradient wanted, no rows, or a pair of more than `keep` rows)."""
    wanted = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    if not wanted or score_index.numel() == 0 or keep <= 0:
        return None
    planned = plan(ahead.pair, chunk, keep)
    if planned is None:
        return None
    h = scored_hidden(hidden, score_index, head)
    gather = _gather(head)
    workspace = Workspace() if workspace is None else workspace
    logps = _FusedHeadAhead.apply(h, target, head.weight, head.bias, chunk, gather, *planned, ahead, workspace)
    return TokenScores(logps, _mean_logits(h, head, gather))
