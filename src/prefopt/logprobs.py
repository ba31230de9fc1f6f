"""Log-probs of the scored tokens, through the LM head in chunks: the [B, T, V] logits never exist.

    hidden = model(..., output_hidden_states=True, logits_to_keep=1).hidden_states[-1]   # [R, T, H]
    tok = token_logps(hidden, batch["score_index"], batch["score_target"], head, head_fn)
    seq = per_sequence(tok.logps, batch["score_seq"], mask, num_seqs)                   # [S]

Only the N positions a loss needs go through the head, `chunk` at a time; each chunk's logits are
formed in fp32, reduced to one log-prob (and one mean logit, for the `logits/*` metrics) and
dropped. Backward recomputes them chunk by chunk (activation checkpointing), so peak memory is
one chunk's [chunk, V] logits instead of [B, T, V] — and the time cost is one extra head matmul.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

# One chunk's fp32 logits take about this many bytes (64M elements × 4 B = 256 MiB).
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


def _score_chunk(h: Tensor, target: Tensor, head: torch.nn.Module, transform) -> tuple[Tensor, Tensor]:
    logits = head(h).float()  # [n, V]
    if transform is not None:
        logits = transform(logits)
    logp = logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, logits.detach().mean(-1)


def chunk_size_for(vocab_size: int, requested: int | None = None) -> int:
    """Tokens per chunk: as asked, or as many as keep one chunk's logits near CHUNK_ELEMENTS."""
    return requested or max(16, CHUNK_ELEMENTS // vocab_size)


def token_logps(
    hidden: Tensor,
    score_index: Tensor,
    score_target: Tensor,
    head: torch.nn.Module,
    transform: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 1024,
) -> TokenScores:
    """Score the N positions `score_index` (flat indices into hidden's [R·T]) against their targets.

    Position i predicts token i+1, so the collator passes the index of the *predicting*
    position with the token that follows it as target. `chunk` is in tokens (see chunk_size_for).
    """
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).index_select(0, score_index)  # [N, H]
    logps, means = [], []
    for start in range(0, h.shape[0], chunk):
        h_c, t_c = h[start : start + chunk], score_target[start : start + chunk]
        if torch.is_grad_enabled() and h_c.requires_grad:
            lp, m = checkpoint(_score_chunk, h_c, t_c, head, transform, use_reentrant=False)
        else:
            lp, m = _score_chunk(h_c, t_c, head, transform)
        logps.append(lp)
        means.append(m)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenScores(empty, empty)
    return TokenScores(torch.cat(logps), torch.cat(means))


def per_sequence(values: Tensor, seq: Tensor, mask: Tensor, num_seqs: int) -> tuple[Tensor, Tensor]:
    """Sum `values` over the positions of each sequence where `mask` holds: ([S] sums, [S] counts)."""
    sums = values.new_zeros(num_seqs).index_add(0, seq, values * mask)
    counts = values.new_zeros(num_seqs).index_add(0, seq, mask.to(values.dtype))
    return sums, counts
