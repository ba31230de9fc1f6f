"""The training step as plain functions: count, score, loss. No transformers here.

    counts = Counts.total([count(b, objective) for b in step_batches])   # the optimizer step's normalisers
    scores = score(model, batch, scorer)                                  # one micro-batch through the model
    step = loss(scores, objective, counts)                                # the one place the loss is composed

`PreferenceTrainer` adapts transformers' loop to these (summing the counts over processes, and
multiplying the loss by the number of processes to undo the gradient mean); `prefopt eval` and the
tests call them directly. The loss of one optimizer step is

    Σ_pairs preference_loss / pairs + nll_weight · Σ_tokens NLL / nll_tokens
      [+ aux_coef · aux_loss · B / pairs]                                            (MoE router)
      [+ diversity_weight · (−α · Σ H / div_tokens + (1 − α) · Σ KL / div_positions)]

where `pairs`, `nll_tokens`, `div_tokens` and `div_positions` count the whole optimizer step (every
accumulation micro-batch on every process): the step's loss and gradients do not depend on how
its pairs are split, and one micro-batch on one process gives TRL's `losses.mean() + cpo_alpha · nll`.
"""

from dataclasses import dataclass, fields
from typing import Protocol

import torch

from .diversity import aligned_pairs
from .diversity import counts as diversity_counts
from .gradahead import Ahead
from .logprobs import TokenScores, per_sequence
from .losses import LOSSES, METHODS, Hyper, Loss, Pairs

Tensor = torch.Tensor
EVAL_LOSS_PART = "preference_loss"  # summed per pair in evaluation; folded into eval_loss when logged


@dataclass(frozen=True)
class Objective:
    """What the step reads of the resolved objective, built once per run."""

    loss: Loss  # the LOSSES entry
    hyper: Hyper
    reduction: str  # "mean" or "sum" of log-probs over completion tokens
    nll_weight: float
    nll_over_prompt: bool  # the NLL term spans the chosen prompt's tokens too (ORPO)
    diversity_weight: float = 0.0
    diversity_alpha: float = 0.0
    aux_coef: float = 0.0  # the MoE router's load-balancing weight (0: no router loss)

    @classmethod
    def of(cls, objective, aux_coef: float = 0.0) -> "Objective":
        """From a resolved `schema.ObjectiveArgs` (and the model's router weight)."""
        o = objective
        method = METHODS[o.method]
        return cls(loss=LOSSES[o.loss_type], hyper=Hyper.from_objective(o), reduction=method.losses[o.loss_type],
                   nll_weight=o.nll_weight, nll_over_prompt=method.nll_span == "prompt+completion",
                   diversity_weight=o.diversity_weight, diversity_alpha=o.diversity_alpha, aux_coef=aux_coef)


@dataclass(frozen=True)
class Counts:
    """What normalises one optimizer step's loss: summed over its micro-batches (and processes)."""

    pairs: Tensor | float  # preference pairs
    nll_tokens: Tensor | float  # positions of the NLL term (chosen completion; ORPO: and its prompt)
    div_tokens: Tensor | float = 0  # chosen completion tokens (the entropy's mean; diversity term only)
    div_positions: Tensor | float = 0  # aligned chosen/rejected positions (the KL's mean; diversity term only)

    def as_tensor(self, device=None) -> Tensor:
        return torch.tensor([float(getattr(self, f.name)) for f in fields(self)], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Counts":
        return cls(*t.unbind(0))

    @classmethod
    def total(cls, counts: list["Counts"], device=None) -> "Counts":
        if not counts:
            return cls(*torch.zeros(len(fields(cls)), dtype=torch.float64, device=device).unbind(0))
        return cls.from_tensor(torch.stack([c.as_tensor(device) for c in counts]).sum(0))

    @classmethod
    def of(cls, scores: "Scores", objective: Objective) -> "Counts":
        """One micro-batch's own counts (evaluation, a direct call): the micro-batch is the whole step."""
        return cls(scores.pairs, scores.nll(objective.nll_over_prompt)[1], scores.entropy_tokens, scores.kl_positions)


def nll_positions(batch: dict, over_prompt: bool) -> Tensor:
    """The scored positions of the NLL term: a chosen sequence's completion tokens, and its prompt's
    where the term spans the prompt (the collator scores prompt tokens only then)."""
    return (batch["score_seq"] < len(batch["row"])) & (batch["score_is_completion"] | over_prompt)


def count(batch: dict, objective: Objective) -> Counts:
    """One micro-batch's share of the optimizer step's normalisers."""
    div = diversity_counts(batch) if objective.diversity_weight else (0, 0)
    return Counts(len(batch["row"]), int(nll_positions(batch, objective.nll_over_prompt).sum()), *div)


@dataclass
class Scores:
    """One micro-batch scored by the model: per sequence (pair i's chosen is i, its rejected K + i,
    for the K pairs kept) and summed terms."""

    logp_sum: Tensor  # [2K] Σ log p over each completion's tokens, differentiable
    tokens: Tensor  # [2K] completion tokens of each sequence
    logit_sum: Tensor  # [2K] Σ over its completion tokens of the mean logit over the vocabulary, detached
    nll_sums: dict  # over_prompt (False, True) → (−Σ log p over the NLL positions of the kept pairs, how many)
    aux_loss: Tensor | None = None  # the MoE router's load-balancing loss of the forward
    entropy_sum: Tensor | None = None  # Σ entropy over the chosen completion positions (diversity term)
    kl_sum: Tensor | None = None  # Σ KL(p_rejected ‖ p_chosen) over the aligned positions
    entropy_tokens: int = 0
    kl_positions: int = 0

    @property
    def pairs(self) -> int:
        return self.logp_sum.shape[0] // 2

    def nll(self, over_prompt: bool) -> tuple[Tensor, Tensor]:
        """The NLL sum and its positions: over the chosen completions, or with their prompts too."""
        return self.nll_sums[over_prompt]


@dataclass(frozen=True)
class DiversityRows:
    """Which scored positions the diversity term reads (rows index the batch's scored positions)."""

    pairs_c: Tensor  # chosen row of each aligned pair
    pairs_r: Tensor  # its rejected row
    chosen: Tensor  # every chosen completion row


class Scorer(Protocol):
    """Runs the model on a batch and scores its positions (implementations: `scoring`)."""

    diversity: bool  # whether it is asked for the diversity term's entropy and KL
    name: str  # what the run's log says it is

    def __call__(self, model, batch: dict, rows: DiversityRows | None,
                 ahead: Ahead | None = None) -> tuple[TokenScores, Tensor | None]: ...


def score(model, batch: dict, scorer: Scorer, keep: int | None = None, objective: Objective | None = None,
          counts: Counts | None = None) -> Scores:
    """Score one micro-batch; with `keep`, only its first `keep` pairs (the others are the
    evaluation sampler's padding duplicates). Given the `objective` (and the step's `counts`) the
    loss will be composed with, a scorer that can forms the head's gradient in forward (`gradahead`)."""
    B = len(batch["row"])
    keep = B if keep is None else keep
    seq, completion = batch["score_seq"], batch["score_is_completion"]
    rows = None
    if scorer.diversity:
        pairs_c, pairs_r, chosen = aligned_pairs(seq, batch["score_index"], completion, B)
        if keep < B:
            live = seq[pairs_c] < keep
            pairs_c, pairs_r, chosen = pairs_c[live], pairs_r[live], chosen[seq[chosen] < keep]
        rows = DiversityRows(pairs_c, pairs_r, chosen)
    ahead = None
    if objective is not None and rows is None and keep == B:
        ahead = Ahead(seq % B, lambda logps: _d_logps(logps, batch, objective, counts))
    tok, aux = scorer(model, batch, rows, ahead)
    return _scores(tok, aux, batch, keep, rows)


def _scores(tok: TokenScores, aux, batch: dict, keep: int, rows: DiversityRows | None) -> Scores:
    B = len(batch["row"])
    seq, completion = batch["score_seq"], batch["score_is_completion"]
    logp_sum, tokens = per_sequence(tok.logps, seq, completion, 2 * B)
    logit_sum, _ = per_sequence(tok.mean_logits, seq, completion, 2 * B)
    nll_sums = {}
    for over_prompt in (False, True):
        mask = nll_positions(batch, over_prompt) & (seq < keep)
        nll_sums[over_prompt] = -(tok.logps * mask).sum(), mask.sum()
    if keep < B:
        live = torch.cat([torch.arange(keep), B + torch.arange(keep)]).to(logp_sum.device)
        logp_sum, tokens, logit_sum = logp_sum[live], tokens[live], logit_sum[live]
    return Scores(logp_sum=logp_sum, tokens=tokens.detach(), logit_sum=logit_sum, nll_sums=nll_sums, aux_loss=aux, entropy_sum=tok.entropy_sum, kl_sum=tok.kl_sum,
                  entropy_tokens=len(rows.chosen) if tok.entropy_sum is not None else 0,
                  kl_positions=len(rows.pairs_c) if tok.entropy_sum is not None else 0)


def _d_logps(logps: Tensor, batch: dict, objective: Objective, counts: Counts | None) -> Tensor:
    """∂(the step's loss)/∂log p at every scored row, from `loss` itself on a detached copy of `logps`
    (the gradient `gradahead` forms in forward; pairs are independent, so a pair's rows are exact
    once that pair is scored, whatever the others read)."""
    with torch.enable_grad():
        lp = logps.detach().requires_grad_(True)
        scores = _scores(TokenScores(lp, torch.zeros_like(lp)), None, batch, len(batch["row"]), None)
        (d,) = torch.autograd.grad(loss(scores, objective, counts).loss, lp, allow_unused=True)
    return torch.zeros_like(lp) if d is None else d


@dataclass
class Step:
    """The loss of one micro-batch and what is logged of it."""

    loss: Tensor  # () this micro-batch's share of the optimizer step's loss
    losses: Tensor  # [K] the preference loss of each pair
    pairs: Pairs  # the reduced log-probs the loss saw
    chosen_rewards: Tensor  # [K] detached
    rejected_rewards: Tensor
    extras: dict  # the loss's own per-pair metrics
    nll: Tensor | None  # the NLL term's value (None: the objective has none)
    nll_sum: Tensor  # () −Σ log p over this micro-batch's NLL positions (the objective's span)
    nll_tokens: Tensor  # () how many


def _mean(total, n) -> Tensor:
    return total / torch.clamp(torch.as_tensor(n, dtype=torch.float32), min=1)


def loss(scores: Scores, objective: Objective, counts: Counts | None = None) -> Step:
    """The objective on one micro-batch, normalised by the optimizer step's `counts` (None: by its own)."""
    o, K = objective, scores.pairs
    logps = scores.logp_sum / scores.tokens.clamp(min=1) if o.reduction == "mean" else scores.logp_sum
    pairs = Pairs(logps[:K], logps[K:], scores.tokens[:K], scores.tokens[K:])
    losses, chosen_rewards, rejected_rewards, extras = o.loss.fn(pairs, o.hyper)
    counts = Counts.of(scores, o) if counts is None else counts
    nll_sum, nll_tokens = scores.nll(o.nll_over_prompt)
    nll = _mean(nll_sum, counts.nll_tokens) if o.nll_weight else None
    total = losses.sum() / counts.pairs + (o.nll_weight * nll if o.nll_weight else 0.0)
    if scores.aux_loss is not None:
        total = total + o.aux_coef * scores.aux_loss * (K / counts.pairs)
    if scores.entropy_sum is not None:
        a = o.diversity_alpha
        total = total + o.diversity_weight * (-a * _mean(scores.entropy_sum, counts.div_tokens)
                                              + (1 - a) * _mean(scores.kl_sum, counts.div_positions))
    return Step(total, losses, pairs, chosen_rewards, rejected_rewards, extras, nll, nll_sum, nll_tokens)


def logged_losses(logs: dict, prefix: str, objective: Objective, split: str):
    """The loss terms of a logged line, from its means over the whole logging window: the diversity
    term, and in evaluation `eval_loss` itself (the mean preference loss over the set's pairs plus
    the NLL, MoE and diversity terms over its tokens) — `loss`'s composition, applied to means."""
    o = objective
    if prefix + "diversity/entropy" in logs:
        a = o.diversity_alpha
        logs[prefix + "diversity/loss"] = -a * logs[prefix + "diversity/entropy"] + (1 - a) * logs[prefix + "diversity/kl"]
    if split != "eval":
        return
    total = logs.pop(prefix + EVAL_LOSS_PART)
    if o.nll_weight:
        total += o.nll_weight * logs[prefix + "nll_loss"]
    if prefix + "aux_loss" in logs:
        total += o.aux_coef * logs[prefix + "aux_loss"]
    if prefix + "diversity/loss" in logs:
        total += o.diversity_weight * logs[prefix + "diversity/loss"]
    logs["eval_loss"] = total
