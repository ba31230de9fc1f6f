"""Reference-free preference losses: pure functions of per-sequence log-probs, and the table
that says what each method needs.

Every loss takes the policy's per-sequence log-probs of the chosen (w) and rejected (l)
completions — already reduced (sum or mean over completion tokens, as METHODS says) — and
returns unreduced per-pair losses plus detached rewards for logging:

    losses, chosen_rewards, rejected_rewards, extras = LOSSES[name](chosen_logps, rejected_logps, h)

All tensors are [B] and computed in float32. The trainer composes the total loss in one place:
``mean(losses) + nll_weight * NLL``; nothing here knows about batches, tokens or models.

This module imports only torch, so `config` can read the METHODS table without pulling in
anything downstream.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Hyper:
    """The objective's hyperparameters, under the papers' names."""

    beta: float  # β: reward scale (ORPO: λ, the weight of the odds-ratio term)
    gamma_beta_ratio: float = 0.0  # γ/β: target reward margin, in units of β (SimPO family)
    label_smoothing: float = 0.0  # ε: probability that a preference label is flipped (sigmoid only)
    alpha: float = 0.0  # α: AlphaPO reward shape; 0 is the plain log-prob reward


def shaped_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape r = (1 - p^(-α)) / α with p = exp(logps); α = 0 gives r = log p.

    Written as -expm1(-α·log p)/α so that no probability is formed: p^(-α) would overflow for
    long sequences summed in log space.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _rewards(chosen_logps: Tensor, rejected_logps: Tensor, h: Hyper) -> tuple[Tensor, Tensor]:
    return shaped_reward(chosen_logps.float(), h.alpha), shaped_reward(rejected_logps.float(), h.alpha)


def sigmoid_loss(chosen_logps: Tensor, rejected_logps: Tensor, h: Hyper):
    """Bradley–Terry loss with an optional target margin (CPO eq. 3; SimPO eq. 6).

        L = -(1-ε)·log σ(β(r_w - r_l - γ/β)) - ε·log σ(-β(r_w - r_l - γ/β))

    With γ/β = 0 and summed log-probs this is CPO's preference term; with mean log-probs and
    γ/β > 0 it is SimPO (arXiv 2405.14734): "the reward of the winning response should exceed
    the losing one by at least γ". ε > 0 is the conservative (label-smoothed) variant.
    """
    r_w, r_l = _rewards(chosen_logps, rejected_logps, h)
    z = h.beta * ((r_w - r_l) - h.gamma_beta_ratio)
    losses = -F.logsigmoid(z) * (1 - h.label_smoothing) - F.logsigmoid(-z) * h.label_smoothing
    return losses, h.beta * r_w.detach(), h.beta * r_l.detach(), {}


def hinge_loss(chosen_logps: Tensor, rejected_logps: Tensor, h: Hyper):
    """Hinge loss on the reward difference (SLiC, arXiv 2305.10425; SimPO's `hinge` variant).

        L = max(0, 1 - β(r_w - r_l - γ/β))

    Pairs already separated by more than 1/β + γ/β contribute nothing.
    """
    r_w, r_l = _rewards(chosen_logps, rejected_logps, h)
    losses = torch.relu(1 - h.beta * ((r_w - r_l) - h.gamma_beta_ratio))
    return losses, h.beta * r_w.detach(), h.beta * r_l.detach(), {}


def ipo_loss(chosen_logps: Tensor, rejected_logps: Tensor, h: Hyper):
    """IPO's squared loss (arXiv 2310.12036, eq. 17), reference-free, β playing the role of τ.

        L = (r_w - r_l - 1/(2β))²

    It regresses the reward gap onto a fixed target instead of pushing it to infinity.
    """
    r_w, r_l = _rewards(chosen_logps, rejected_logps, h)
    losses = ((r_w - r_l) - 1 / (2 * h.beta)) ** 2
    return losses, h.beta * r_w.detach(), h.beta * r_l.detach(), {}


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation at either end (Mächler 2012).

    Near 0, 1 - exp(x) loses every digit, so use log(-expm1(x)); far below, exp(x) underflows
    harmlessly, so use log1p(-exp(x)). The switch at -ln 2 keeps both branches accurate.
    """
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_logps: Tensor, rejected_logps: Tensor, h: Hyper):
    """ORPO's odds-ratio term (arXiv 2403.07691, eq. 7), weighted by λ (here `beta`).

        log odds(y) = log p(y) - log(1 - p(y))       with p the mean per-token probability
        L_OR        = -λ · log σ(log odds(y_w) - log odds(y_l))

    The NLL half of ORPO (over prompt and chosen completion) is added by the trainer, like
    every other NLL term. `extras` carries TRL's `log_odds_ratio` (log σ of the log-odds gap)
    and `log_odds_chosen` (the gap itself), per pair.

    A mean log-prob that rounds to exactly 0 (a completion the model is certain of) would give
    an infinite log-odds and NaN gradients; log-probs are capped at -1e-7 (p ≤ 0.9999999).
    """
    lw, ll = chosen_logps.float().clamp(max=-1e-7), rejected_logps.float().clamp(max=-1e-7)
    log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll))
    ratio = F.logsigmoid(log_odds)
    extras = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return -h.beta * ratio, h.beta * lw.detach(), h.beta * ll.detach(), extras


LossFn = Callable[[Tensor, Tensor, Hyper], tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "odds_ratio": odds_ratio_loss,
}


@dataclass(frozen=True)
class Method:
    """What a method needs. `losses` maps each allowed loss shape (the first is the default)
    to the log-prob reduction it is defined with: "sum" or "mean" over completion tokens."""

    title: str
    paper: str
    losses: dict[str, str]
    nll_span: str  # what the NLL term covers when nll_weight > 0: "completion" | "prompt+completion"
    defaults: dict[str, float] = field(default_factory=dict)
    margin: bool = False  # accepts a target margin γ/β
    reward_shape: bool = True  # accepts AlphaPO's α
    # the published recipes' ranges, for the warnings before training (None: no advice)
    full_lr: tuple[float, float] | None = None  # learning rate for full fine-tuning
    beta_range: tuple[float, float] | None = None


_SIMPO_LOSSES = {"sigmoid": "mean", "hinge": "mean"}

METHODS: dict[str, Method] = {
    "simpo": Method(
        title="SimPO",
        paper="arXiv 2405.14734",
        losses=_SIMPO_LOSSES,
        nll_span="completion",
        defaults={"beta": 2.0, "gamma_beta_ratio": 0.5, "nll_weight": 0.0, "alpha": 0.0},
        margin=True,
        full_lr=(3e-7, 1e-6),
        beta_range=(2.0, 10.0),
    ),
    "cpo_simpo": Method(
        title="CPO-SimPO (SimPO + NLL on the chosen completion)",
        paper="CPO_SIMPO repository; arXiv 2401.08417 + 2405.14734",
        losses=_SIMPO_LOSSES,
        nll_span="completion",
        defaults={"beta": 10.0, "gamma_beta_ratio": 0.54, "nll_weight": 0.05, "alpha": 0.0},
        margin=True,
        full_lr=(3e-7, 1e-6),
        beta_range=(2.0, 10.0),
    ),
    "alphapo": Method(
        title="AlphaPO (SimPO with a shaped reward)",
        paper="arXiv 2501.03884",
        losses=_SIMPO_LOSSES,
        nll_span="completion",
        # α = 0.25 is the paper's recommended positive shape; β and γ/β follow SimPO.
        defaults={"beta": 2.0, "gamma_beta_ratio": 0.5, "nll_weight": 0.0, "alpha": 0.25},
        margin=True,
        full_lr=(3e-7, 1e-6),
        beta_range=(2.0, 10.0),
    ),
    "cpo": Method(
        title="CPO",
        paper="arXiv 2401.08417",
        losses={"sigmoid": "sum", "hinge": "sum", "ipo": "mean"},
        nll_span="completion",
        defaults={"beta": 0.1, "gamma_beta_ratio": 0.0, "nll_weight": 1.0, "alpha": 0.0},
        full_lr=(5e-7, 1e-6),
    ),
    "orpo": Method(
        title="ORPO",
        paper="arXiv 2403.07691",
        losses={"odds_ratio": "mean"},
        nll_span="prompt+completion",
        defaults={"beta": 0.1, "gamma_beta_ratio": 0.0, "nll_weight": 1.0, "alpha": 0.0},
        reward_shape=False,
    ),
}

# Which loss shapes take label smoothing (the others are not probabilistic).
SMOOTHABLE = frozenset({"sigmoid"})
