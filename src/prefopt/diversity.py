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

Every position's logits are formed once, in chunks that keep each aligned pair together, and
recomputed in backward (checkpoint): no [batch, seq, vocab] tensor, no second forward.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _rows(h: Tensor, target: Tensor, head, transform) -> tuple[Tensor, Tensor, Tensor]:
    """log p(target), mean logit and the log-softmax of each row (one head matmul)."""
    z = head(h).float()
    if transform is not None:
        z = transform(z)
    logp = F.log_softmax(z, dim=-1)
    return logp.gather(-1, target[:, None]).squeeze(-1), z.detach().mean(-1), logp


def _pair_chunk(h_c, t_c, h_r, t_r, head, transform):
    lp_c, m_c, logp_c = _rows(h_c, t_c, head, transform)
    lp_r, m_r, logp_r = _rows(h_r, t_r, head, transform)
    entropy = -(logp_c.exp() * logp_c).sum(-1)
    kl = (logp_r.exp() * (logp_r - logp_c)).sum(-1)
    return lp_c, m_c, lp_r, m_r, entropy, kl


def _single_chunk(h, t, head, transform):
    lp, m, logp = _rows(h, t, head, transform)
    return lp, m, -(logp.exp() * logp).sum(-1)


def score_with_diversity(h: Tensor, target: Tensor, pairs_c: Tensor, pairs_r: Tensor, chosen_rows: Tensor, head,
                         transform, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-probs and mean logits of every scored row ([N] each), Σ entropy over the chosen
    completion rows and Σ KL(p_r ‖ p_c) over the aligned pairs — each row's logits formed once,
    `chunk` rows at a time, each aligned pair in one chunk, recomputed in backward."""
    N = h.shape[0]
    logps = h.new_zeros(N, dtype=torch.float32)
    means = h.new_zeros(N, dtype=torch.float32)
    entropy, kl = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and h.requires_grad
    run = (lambda f, *a: checkpoint(f, *a, head, transform, use_reentrant=False)) if grad else \
        (lambda f, *a: f(*a, head, transform))
    done = torch.zeros(N, dtype=torch.bool, device=h.device)
    step = max(1, chunk // 2)
    for s in range(0, len(pairs_c), step):
        c, r = pairs_c[s : s + step], pairs_r[s : s + step]
        lp_c, m_c, lp_r, m_r, e, k = run(_pair_chunk, h[c], target[c], h[r], target[r])
        logps, means = logps.index_put((c,), lp_c).index_put((r,), lp_r), means.index_put((c,), m_c).index_put((r,), m_r)
        entropy, kl = entropy + e.sum(), kl + k.sum()
        done[c], done[r] = True, True
    single = chosen_rows[~done[chosen_rows]]
    for s in range(0, len(single), chunk):
        rows = single[s : s + chunk]
        lp, m, e = run(_single_chunk, h[rows], target[rows])
        logps, means = logps.index_put((rows,), lp), means.index_put((rows,), m)
        entropy = entropy + e.sum()
        done[rows] = True
    rest = torch.nonzero(~done).squeeze(1)
    for s in range(0, len(rest), chunk):
        rows = rest[s : s + chunk]
        lp, m, _ = run(_single_chunk, h[rows], target[rows])
        logps, means = logps.index_put((rows,), lp), means.index_put((rows,), m)
    return logps, means, entropy, kl


def terms_from_logits(z: Tensor, pairs_c: Tensor, pairs_r: Tensor, chosen_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The same sums from logits already formed for every scored row ([N, V]; the FSDP tied-head path)."""
    logp = F.log_softmax(z.float(), dim=-1)
    entropy = -(logp[chosen_rows].exp() * logp[chosen_rows]).sum()
    kl = (logp[pairs_r].exp() * (logp[pairs_r] - logp[pairs_c])).sum()
    return entropy, kl


def counts(batch: dict) -> tuple[int, int]:
    """(chosen completion tokens, aligned positions) of a micro-batch, for the step's normalisers."""
    B = len(batch["row"])
    seq, comp = batch["score_seq"], batch["score_is_completion"]
    lengths = torch.bincount(seq[comp], minlength=2 * B)
    return int(lengths[:B].sum()), int(torch.minimum(lengths[:B], lengths[B:]).sum())
