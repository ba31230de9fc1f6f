"""The diversity term of diversity-promoting SimPO, inside the one scoring pass.

    diversity_loss = −α · H(chosen) + (1 − α) · KL(p_rejected ‖ p_chosen)
    total_loss     = preference_loss (+ NLL) + diversity_weight · diversity_loss

H(chosen) is the entropy of the policy's next-token distribution at each position of the chosen
response (the positions that predict its tokens), averaged over the chosen completion tokens of
the optimizer step. KL(p_r ‖ p_c) = Σ_v p_r(v) (log p_r(v) − log p_c(v)) compares the
distributions at position k of the chosen response and position k of the rejected one of the
same pair, for k below the shorter length, averaged over those aligned positions. (The source
computes `kl_div(log_softmax(chosen), softmax(rejected))`, which is this direction.)

What minimising it does to the policy:
- −α·H raises the entropy of the chosen-response distributions: it flattens them, spreading
  probability from the top tokens to the rest (more varied samples, less confident answers).
- (1−α)·KL pulls the two distributions *together*: its gradient moves p_chosen toward covering
  p_rejected's mass (mass-covering on the chosen side) and p_rejected toward p_chosen. It makes
  the policy's next-token distributions on the chosen and the rejected response more alike at
  aligned positions — it does not push chosen away from rejected; it works against the
  separation the preference term builds, and is a regulariser, not a diversity force by itself.

This module holds the mathematics only: which positions pair up (`aligned_pairs`), how many the
optimizer step's means divide by (`counts`), and the two terms of a row of log-probabilities
(`entropy`, `kl`). The scorers apply them: `scoring.ModuleHead` (checkpointed chunks that keep each
aligned pair together, recomputed in backward) and `scoring.OwnHead` (the model's own logits) call
`entropy` and `kl`; `scoring.FusedHead` forms the same sums and their gradients inside
`logprobs._FusedHeadDiversity`, from the same chunks (`logprobs.diversity_groups`). No
[batch, seq, vocab] tensor, no second forward.
"""

import torch

Tensor = torch.Tensor


def ranks_in_sequence(seq: Tensor, score_index: Tensor, mask: Tensor) -> Tensor:
    """For each scored position where `mask` holds, its 0-based rank among its sequence's masked
    positions in token order (-1 elsewhere)."""
    rank = torch.full_like(seq, -1)
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() == 0:
        return rank
    key = seq[idx] * (int(score_index.max()) + 1) + score_index[idx]
    order = idx[torch.argsort(key)]
    s = seq[order]
    start = torch.ones_like(s, dtype=torch.bool)
    start[1:] = s[1:] != s[:-1]
    position = torch.arange(len(order), device=seq.device)
    first = torch.cummax(torch.where(start, position, torch.zeros_like(position)), 0).values
    rank[order] = position - first
    return rank


def aligned_pairs(seq: Tensor, score_index: Tensor, is_completion: Tensor, B: int) -> tuple[Tensor, Tensor, Tensor]:
    """(chosen rows, rejected rows) of the aligned completion positions, and all chosen
    completion rows; rows index the scored positions."""
    chosen = is_completion & (seq < B)
    rejected = is_completion & (seq >= B)
    rank = ranks_in_sequence(seq, score_index, is_completion)
    c_rows = torch.nonzero(chosen).squeeze(1)
    r_rows = torch.nonzero(rejected).squeeze(1)
    width = int(rank.max()) + 1 if rank.numel() else 1
    c_key = seq[c_rows] * width + rank[c_rows]
    r_key = (seq[r_rows] - B) * width + rank[r_rows]
    r_sorted, r_order = torch.sort(r_key)
    at = torch.searchsorted(r_sorted, c_key).clamp(max=max(len(r_sorted) - 1, 0))
    hit = (r_sorted[at] == c_key) if len(r_sorted) else torch.zeros_like(c_key, dtype=torch.bool)
    return c_rows[hit], r_rows[r_order[at[hit]]], c_rows


def entropy(logp: Tensor) -> Tensor:
    """H(p) = −Σ_v p(v) log p(v) of each row of log-probabilities [n, V] → [n]."""
    return -(logp.exp() * logp).sum(-1)


def kl(logp_r: Tensor, logp_c: Tensor) -> Tensor:
    """KL(p_r ‖ p_c) = Σ_v p_r(v) (log p_r(v) − log p_c(v)) of each pair of rows [n, V] → [n]."""
    return (logp_r.exp() * (logp_r - logp_c)).sum(-1)


def counts(batch: dict) -> tuple[int, int]:
    """(chosen completion tokens, aligned positions) of a micro-batch, for the step's normalisers."""
    B = len(batch["row"])
    seq, comp = batch["score_seq"], batch["score_is_completion"]
    lengths = torch.bincount(seq[comp], minlength=2 * B)
    return int(lengths[:B].sum()), int(torch.minimum(lengths[:B], lengths[B:]).sum())
