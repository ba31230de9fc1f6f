"""Log-probs of the scored tokens, through the LM head in chunks: the [B, T, V] logits never exist.

    hidden = model(..., output_hidden_states=True, logits_to_keep=1).hidden_states[-1]   # [R, T, H]
    tok = token_logps(hidden, batch["score_index"], batch["score_target"], head, transform, chunk)
    sums, counts = per_sequence(tok.logps, batch["score_seq"], mask, num_seqs)          # [S] each

Only the N positions a loss needs go through the head, `chunk` at a time; each chunk's logits are
formed in fp32, reduced to one log-prob and dropped. Backward recomputes them chunk by chunk, so
peak memory is one chunk's [chunk, V] logits instead of [B, T, V] — and the time cost is one
extra head matmul. Two implementations of the same function:

- `_FusedHeadLogps` (a plain `nn.Linear` head, the common case): forward keeps only the [N]
  log-sum-exps; backward recomputes a chunk's logits once and turns them, in place, into
  g·(onehot − softmax), the gradient of the logits — one [chunk, V] buffer, no extra passes.
- `torch.utils.checkpoint` around the head *module*, for heads that must be called as modules:
  ZeRO-3 gathers partitioned weights in the module's hooks, LoRA or quantization replace the
  linear, and Gemma-2's soft-cap is a non-linear step after it.
- In training, `gradahead` forms `_FusedHeadLogps`' gradient in forward instead, a group of
  whole pairs at a time (the step's loss is a sum over pairs), with this module's helpers.
- With the diversity term, the same two forms over `diversity_groups`' chunks (each aligned
  chosen/rejected pair in one chunk): `_FusedHeadDiversity` and `scoring.score_with_diversity`,
  which also return Σ entropy and Σ KL.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

# One chunk's fp32 logits take about this many bytes (64M elements × 4 B = 256 MiB, whatever the
# vocabulary). Each chunk re-reads the [V, H] head weight and its gradient, so small chunks are
# slow: at V = 128k, H = 256, N = 2600 (2 cores), forward + backward took 6.8 s with 128-token
# chunks, 5.65 s with 512 and 5.4 s with 1024.
CHUNK_ELEMENTS = 64 * 1024 * 1024


def head_transform(config) -> Callable[[Tensor], Tensor] | None:
    """What the architecture does to the head's output before the softmax, if anything.

    Gemma-2/3 soft-cap the logits, Cohere multiplies them and Granite divides them; the plain
    forward applies these after the LM head, so the chunked path must too or its log-probs
    would silently differ.
    """
    text = config.get_text_config()
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    divide = getattr(text, "logits_scaling", None)
    if cap:
        return lambda z: torch.tanh(z / cap) * cap
    if scale is not None and scale != 1:
        return lambda z: z * scale
    if divide is not None and divide != 1:
        return lambda z: z / divide
    return None


@dataclass
class TokenScores:
    logps: Tensor  # [N] fp32 log p(target) at each scored position, differentiable
    mean_logits: Tensor  # [N] fp32 mean over the vocabulary of the logits there, detached
    entropy_sum: Tensor | None = None  # the diversity term's sums, when the scorer was asked for them
    kl_sum: Tensor | None = None


class _FusedHeadLogps(torch.autograd.Function):
    """log p(target) = z[target] − logsumexp(z), z = h Wᵀ + b, for N positions in chunks.

    The first `keep` rows keep their exp(z − max z) ([keep, V] fp32) from forward to backward; the
    rest are recomputed there, chunk by chunk, into one reused buffer. Backward never rewrites those
    [·, V] blocks: with p = e / s (e kept or recomputed, s its row sum) and gradient g per row,

        ∂/∂h = g ⊙ W[t] − (g/s) ⊙ (e W)        ∂/∂W = Σ g h ⊗ onehot(t) − eᵀ ((g/s) ⊙ h)

    so a kept block costs two matmuls and no elementwise pass, a recomputed one one more matmul.
    """

    @staticmethod
    def forward(ctx, h: Tensor, target: Tensor, weight: Tensor, bias: Tensor | None, chunk: int,
                gather=nullcontext, keep: int = 0) -> Tensor:
        N, V = h.shape[0], weight.shape[0]
        keep = min(keep, N)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        sums = torch.empty(N, dtype=torch.float32, device=h.device)
        kept = torch.empty(keep, V, dtype=torch.float32, device=h.device)
        # the recomputed rows' logits, one chunk at a time: allocated once, reused by backward
        spare = torch.empty(min(chunk, N - keep), V, dtype=torch.float32, device=h.device)
        with gather():
            # the kept rows' logits in one matmul (faster than chunk-sized ones), then turned into
            # exp(z − max z) a chunk at a time; the other rows' in the spare buffer, chunk by chunk
            _logits_into(h[:keep], weight, bias, kept)
            for rows in _blocks(0, N, keep, chunk):
                if rows.stop <= keep:
                    out = kept[rows]
                else:
                    out = _logits_into(h[rows], weight, bias, spare[: rows.stop - rows.start])
                logp[rows], lse[rows], sums[rows] = _exp_logits(out, target[rows])
        ctx.save_for_backward(h, target, lse, kept)
        ctx.sums, ctx.spare = sums[:keep], spare
        # kept as attributes, not saved tensors: a ZeRO-3 weight's storage is swapped by `gather`
        ctx.weight, ctx.bias, ctx.chunk, ctx.gather = weight, bias, chunk, gather
        # Backward recomputes the logits, and must do so in this forward's precision: under bf16
        # autocast here but not in backward (the usual case: backward() is called outside the region),
        # exp(z − lse) would mix fp32 logits with these bf16-logit log-sum-exps, a softmax that no
        # longer sums to one, i.e. a biased gradient (tests/test_bf16.py).
        ctx.autocast = autocast_state(h)
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        h, target, lse, kept = ctx.saved_tensors
        with ctx.gather(), replay_autocast(ctx.autocast):
            return _FusedHeadLogps._backward(ctx, h, target, ctx.weight, ctx.bias, lse, kept, grad_logp)

    @staticmethod
    def _backward(ctx, h, target, weight, bias, lse, kept, grad_logp):
        grads = _HeadGrads(ctx.needs_input_grad, h, weight, bias)
        g = grad_logp.float()
        grads.add_target(target, g)
        keep = kept.shape[0]
        if keep:
            grads.sub_softmax(slice(0, keep), kept, g[:keep] / ctx.sums)
        for rows in _blocks(keep, h.shape[0], keep, ctx.chunk):
            z = _logits_into(h[rows], weight, bias, ctx.spare[: rows.stop - rows.start])
            grads.sub_softmax(rows, z.sub_(lse[rows, None]).exp_(), g[rows])
        return grads.result()


def autocast_state(t: Tensor) -> tuple:
    """The autocast state of `t`'s device now (a fused function's forward records it)."""
    device = t.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def replay_autocast(state: tuple):
    """That state again, for backward's recompute (backward() usually runs outside the region)."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


def _blocks(start: int, stop: int, keep: int, chunk: int):
    """Row slices of at most `chunk` rows covering [start, stop), none straddling `keep`."""
    for lo, hi in ((start, min(keep, stop)), (max(keep, start), stop)):
        for s in range(lo, hi, chunk):
            yield slice(s, min(s + chunk, hi))


def _logits_into(h: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """z = h Wᵀ + b written into `out` ([n, V] fp32), in the precision F.linear would use here."""
    if out.dtype == h.dtype == weight.dtype and not torch.is_autocast_enabled(h.device.type):
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)
    return out.copy_(F.linear(h, weight, bias))


def _exp_logits(out: Tensor, target: Tensor):
    """Logits `out` ([n, V] fp32) turned in place into e = exp(z − max z); returns per row
    (log p(target), log-sum-exp, Σ e)."""
    z_t = out.gather(1, target[:, None]).squeeze(1)
    top = out.amax(1)
    out.sub_(top[:, None]).exp_()
    sums = out.sum(1)
    lse = sums.log().add_(top)
    return z_t - lse, lse, sums


class _HeadGrads:
    """The gradients of h, W and b (those autograd asks for), accumulated chunk by chunk; `result`
    is a fused function's backward return value. Two ways in: `add` takes a chunk's gradient of
    the logits, `add_target` + `sub_softmax` take it as g·onehot(t) − scale·e without forming it."""

    def __init__(self, needs_input_grad, h: Tensor, weight: Tensor, bias: Tensor | None):
        need_h, _, need_w, need_b, *_ = needs_input_grad
        self.h, self.weight, self.bias, self.extra = h, weight, bias, len(needs_input_grad) - 4
        self.grad_h32 = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        self.grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

    def add(self, rows, h_c: Tensor, z_grad: Tensor):
        if self.grad_h32 is not None:
            self.grad_h32[rows] = (z_grad.to(self.h.dtype) @ self.weight).float()
        if self.grad_w is not None:
            self.grad_w.addmm_(z_grad.t(), h_c.float())
        if self.grad_b is not None:
            self.grad_b += z_grad.sum(0)

    def add_target(self, target: Tensor, g: Tensor):
        """The g·onehot(t) part of every row's gradient of the logits ([N] each)."""
        if self.grad_h32 is not None:
            self.grad_h32 += self.weight.index_select(0, target).float().mul_(g[:, None])
        if self.grad_w is not None:
            self.grad_w.index_add_(0, target, self.h.float() * g[:, None])
        if self.grad_b is not None:
            self.grad_b.index_add_(0, target, g)

    def sub_softmax(self, rows: slice, e: Tensor, scale: Tensor):
        """The −scale·e part for `rows`: e [n, V] fp32, scale [n] (g/s for unnormalised e)."""
        if self.grad_h32 is not None:
            self.grad_h32[rows] -= (e.to(self.weight.dtype) @ self.weight).float().mul_(scale[:, None])
        if self.grad_w is not None:
            self.grad_w.addmm_(e.t(), self.h[rows].float() * scale[:, None], alpha=-1)
        if self.grad_b is not None:
            self.grad_b.addmv_(e.t(), scale, alpha=-1)

    def result(self, scale: Tensor | float = 1.0) -> tuple:
        """The backward return value, every gradient times `scale` (the gradient ahead's factor)."""
        def out(grad, like):
            if grad is None:
                return None
            return (grad if isinstance(scale, float) and scale == 1.0 else grad * scale).to(like.dtype)
        return (out(self.grad_h32, self.h), None, out(self.grad_w, self.weight),
                out(self.grad_b, self.bias)) + (None,) * self.extra


def diversity_groups(N: int, pairs_c: Tensor, pairs_r: Tensor, chosen: Tensor, chunk: int, device):
    """The scored rows in chunks for the diversity term: (rows, aligned pairs k, entropy wanted)
    per chunk. Pair chunks hold k chosen rows then their k rejected rows (so KL sees both), then
    the other chosen completion rows (entropy only), then the rest (log-probs only)."""
    done = torch.zeros(N, dtype=torch.bool, device=device)
    step = max(1, chunk // 2)
    groups = []
    for s in range(0, len(pairs_c), step):
        c, r = pairs_c[s : s + step], pairs_r[s : s + step]
        groups.append((torch.cat([c, r]), len(c), True))
        done[c], done[r] = True, True
    single = chosen[~done[chosen]]
    done[single] = True
    rest = torch.nonzero(~done).squeeze(1)
    groups += [(single[s : s + chunk], 0, True) for s in range(0, len(single), chunk)]
    groups += [(rest[s : s + chunk], 0, False) for s in range(0, len(rest), chunk)]
    return groups


class _FusedHeadDiversity(torch.autograd.Function):
    """`_FusedHeadLogps` with the diversity term's sums from the same chunks: log p(target) at N
    positions, Σ H(p) over the chosen completion rows and Σ KL(p_r ‖ p_c) over the aligned pairs.
    Forward keeps the [N] log-sum-exps only; backward recomputes each chunk's logits once and forms
    the logits' gradient of all three terms:

        d log p(t)/dz = onehot(t) − p      dH/dz = −p ⊙ (log p + H)
        dKL/dz_r = p_r ⊙ (log p_r − log p_c − KL)      dKL/dz_c = p_c − p_r
    """

    @staticmethod
    def forward(ctx, h, target, weight, bias, groups, gather=nullcontext):
        N = h.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        logp_t = torch.empty(N, dtype=torch.float32, device=h.device)
        entropy = torch.zeros((), dtype=torch.float32, device=h.device)
        kl = torch.zeros((), dtype=torch.float32, device=h.device)
        with gather():
            for rows, k, with_entropy in groups:
                logp = F.linear(h[rows], weight, bias).float()
                lse[rows] = torch.logsumexp(logp, dim=-1)
                logp.sub_(lse[rows][:, None])  # the log-softmax, in place
                logp_t[rows] = logp.gather(1, target[rows, None]).squeeze(1)
                if with_entropy:
                    p = logp.exp()
                    H = -(p * logp).sum(-1)
                    entropy += H.sum() if k == 0 else H[:k].sum()
                    if k:
                        kl += (p[k:] * (logp[k:] - logp[:k])).sum()
        ctx.save_for_backward(h, target, lse)
        ctx.weight, ctx.bias, ctx.groups, ctx.gather = weight, bias, groups, gather
        ctx.autocast = autocast_state(h)
        return logp_t, entropy, kl

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_kl):
        h, target, lse = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grads = _HeadGrads(ctx.needs_input_grad, h, weight, bias)
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_e = 0.0 if g_entropy is None else g_entropy.float()
        g_k = 0.0 if g_kl is None else g_kl.float()
        with ctx.gather(), replay_autocast(ctx.autocast):
            for rows, k, with_entropy in ctx.groups:
                h_c = h[rows]
                logp = F.linear(h_c, weight, bias).float().sub_(lse[rows][:, None])
                p = logp.exp()
                g = g_logp[rows]
                grad = p * -g[:, None]
                grad[torch.arange(len(rows), device=grad.device), target[rows]] += g
                if with_entropy:
                    e = slice(0, k) if k else slice(None)
                    H = -(p[e] * logp[e]).sum(-1, keepdim=True)
                    grad[e] -= g_e * p[e] * (logp[e] + H)
                    if k:
                        diff = logp[k:] - logp[:k]
                        divergence = (p[k:] * diff).sum(-1, keepdim=True)
                        grad[k:] += g_k * p[k:] * (diff - divergence)
                        grad[:k] += g_k * (p[:k] - p[k:])
                grads.add(rows, h_c, grad)
        return grads.result()


def fused_diversity_scores(h: Tensor, target: Tensor, pairs_c: Tensor, pairs_r: Tensor, chosen: Tensor,
                           head: torch.nn.Module, chunk: int) -> TokenScores:
    """Log-probs, mean logits and the diversity term's sums of the N scored rows `h` ([N, H], in
    the head's dtype) through a plain Linear head, fused (see `_FusedHeadDiversity`)."""
    gather = _gather(head)
    groups = diversity_groups(h.shape[0], pairs_c, pairs_r, chosen, chunk, h.device)
    logps, entropy, kl = _FusedHeadDiversity.apply(h, target, head.weight, head.bias, groups, gather)
    return TokenScores(logps, _mean_logits(h, head, gather), entropy, kl)


def _mean_logits(h: Tensor, head: torch.nn.Module, gather) -> Tensor:
    with torch.no_grad(), gather():
        # mean over the vocabulary of h·W_vᵀ + b_v is h·mean(W) + mean(b): no [N, V] pass
        means = h.float() @ head.weight.float().mean(0)
        if head.bias is not None:
            means += head.bias.float().mean()
    return means


def fusable(head: torch.nn.Module, transform) -> bool:
    """Whether the fused path may read the head's weight directly (see the module docstring).

    A ZeRO-3-partitioned head qualifies only when frozen (LoRA): the fused path then gathers it
    itself around forward and backward. (Called as a module inside a checkpoint, a frozen
    partitioned head is not gathered again for the recompute.) A trainable one stays a module,
    so ZeRO-3 receives its gradient through its own hooks.
    """
    return (type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter and transform is None
            and not (hasattr(head.weight, "ds_id") and head.weight.requires_grad))


def frozen_zero3_copy(head: torch.nn.Module):
    """For a frozen head that ZeRO-3 partitions: a plain function over a gathered copy of its
    weights (one full head for the micro-batch), so checkpointed chunks can recompute with it;
    None for any other head."""
    if not hasattr(head.weight, "ds_id") or head.weight.requires_grad or type(head) is not torch.nn.Linear:
        return None
    with _gather(head)():
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if head.bias is not None else None
    return lambda h: F.linear(h, weight, bias)


def _gather(head: torch.nn.Module):
    """A context that makes a ZeRO-3-partitioned head's parameters whole (read-only) inside it."""
    if not hasattr(head.weight, "ds_id"):
        return nullcontext
    import deepspeed

    params = [p for p in (head.weight, head.bias) if p is not None]
    return lambda: deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _score_chunk(h: Tensor, target: Tensor, head: torch.nn.Module, transform) -> tuple[Tensor, Tensor]:
    logits = head(h).float()  # [n, V]
    if transform is not None:
        logits = transform(logits)
    logp = logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, logits.detach().mean(-1)


def run_chunk(fn, h: Tensor, *args):
    """fn(h, *args) for one chunk of scored rows `h`; under a checkpoint when a gradient will flow
    back through it, so its [chunk, V] logits are recomputed in backward instead of kept."""
    if torch.is_grad_enabled() and h.requires_grad:
        return checkpoint(fn, h, *args, use_reentrant=False)
    return fn(h, *args)


def chunk_size_for(vocab_size: int, requested: int | None = None) -> int:
    """Tokens per chunk: as asked, or as many as keep one chunk's logits near CHUNK_ELEMENTS."""
    return requested or max(16, CHUNK_ELEMENTS // vocab_size)


def keep_rows_for(vocab_size: int, keep_mb: int) -> int:
    """Rows of fp32 softmax (4·V bytes each) that fit in `keep_mb` MB."""
    return keep_mb * 1_000_000 // (4 * vocab_size)


def scored_hidden(hidden: Tensor, score_index: Tensor, head: torch.nn.Module) -> Tensor:
    """The [N, H] hidden states of the scored positions, in the head's dtype."""
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dtype.is_floating_point and h.dtype != weight.dtype:
        # e.g. bf16 weights under CPU autocast hand back fp32 hidden states; the head runs in its dtype
        h = h.to(weight.dtype)
    return h


def token_logps(
    hidden: Tensor,
    score_index: Tensor,
    score_target: Tensor,
    head: torch.nn.Module,
    transform: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 1024,
    fused: bool | None = None,
    keep: int = 0,
) -> TokenScores:
    """Score the N positions `score_index` (flat indices into hidden's [R·T]) against their targets.

    Position i predicts token i+1, so the collator passes the index of the *predicting*
    position with the token that follows it as target. `chunk` is in tokens (see chunk_size_for);
    the fused path keeps up to `keep` rows' softmax for backward instead of recomputing it (keep_rows_for).
    """
    h = scored_hidden(hidden, score_index, head)
    if fused is None:
        fused = fusable(head, transform)
    if fused:
        gather = _gather(head)
        logps = _FusedHeadLogps.apply(h, score_target, head.weight, head.bias, chunk, gather, keep)
        return TokenScores(logps, _mean_logits(h, head, gather))
    logps, means = [], []
    for start in range(0, h.shape[0], chunk):
        lp, m = run_chunk(_score_chunk, h[start : start + chunk], score_target[start : start + chunk], head, transform)
        logps.append(lp)
        means.append(m)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenScores(empty, empty)
    return TokenScores(torch.cat(logps), torch.cat(means))


def logps_from_logits(z: Tensor, target: Tensor) -> TokenScores:
    """Scores from logits the model computed itself, one [V] row per scored position (any
    softcap or scaling is already applied by the model's forward)."""
    z = z.float()
    logps = z.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return TokenScores(logps, z.detach().mean(-1))


def per_sequence(values: Tensor, seq: Tensor, mask: Tensor, num_seqs: int) -> tuple[Tensor, Tensor]:
    """Sum `values` over the positions of each sequence where `mask` holds: ([S] sums, [S] counts)."""
    sums = values.new_zeros(num_seqs).index_add(0, seq, values * mask)
    counts = values.new_zeros(num_seqs).index_add(0, seq, mask.to(values.dtype))
    return sums, counts
