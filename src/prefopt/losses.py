"""Reference-free preference losses: one table entry per loss shape, and the methods built on them.

A loss shape is one entry of `LOSSES`: its function, the formula `config explain` prints, and
whether it takes label smoothing. A function receives the B pairs of a micro-batch as `Pairs`
(per-sequence log-probs already reduced — sum or mean over completion tokens, as the method
says — and the completion token counts) and the objective's hyperparameters as `Hyper`:

    losses, chosen_rewards, rejected_rewards, extras = LOSSES[shape].fn(pairs, hyper)

all [B], unreduced, in float32; the rewards (and extras, logged under their names) are
detached. `step.loss` composes the total in its one place: Σ losses / pairs + nll_weight · NLL
(+ the MoE and diversity terms); nothing here knows about batches, token positions or models.

`Hyper` is the one list of hyperparameters: each field carries its help text, its label, its
range, its refusal and its neutral value; `schema` builds the keys, `values` the range checks,
`config` the resolution and `explanation` its rows from it. `METHODS` says, per method, the loss shapes it allows (with their reduction) and, in one
dict, the hyperparameters it takes with their published defaults; what a method does not take is
held at its neutral value, and a user who sets it is refused. Both tables are checked at import.

Adding a loss is one entry here (its function, its formula, a `Method` if it is a method of its
own) and a test with hand-worked values.

This module imports only torch, so `config` can read the tables without pulling in anything
downstream.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pairs:
    """What a loss sees of B pairs."""

    chosen_logps: Tensor  # [B] log p(y_w | x), summed or averaged over its completion tokens
    rejected_logps: Tensor  # [B] the same for y_l
    chosen_tokens: Tensor  # [B] completion tokens of y_w (after truncation)
    rejected_tokens: Tensor  # [B] completion tokens of y_l


def _hyper(default: float, help: str, label: str, low: float | None = 0.0, low_open: bool = False,
           high: float | None = None, high_open: bool = False, note: str = "",
           refusal: str = "{method} does not use {name}; remove it.", main: bool = False, nullable: bool = True) -> field:
    """A hyperparameter: `label` is its row in `config explain`; `default` is its neutral value (what a method that does not take it uses);
    `low`/`high` its range and `note` what config's value check adds to its message; `refusal`
    what a user who sets it for a method that does not take it is told (a method may say it better:
    `Method.refusals`). `main`: shown before the NLL rows in `config explain` (scale and margins);
    `nullable`: whether `null` means "the method's default" (else it is refused as a value)."""
    return field(default=default, metadata=dict(help=help, label=label, low=low, low_open=low_open, high=high,
                                                high_open=high_open, note=note, refusal=refusal, main=main,
                                                nullable=nullable))


@dataclass(frozen=True)
class Hyper:
    """The objective's hyperparameters, under the papers' names."""

    beta: float = _hyper(1.0, "β: reward scale (λ for ORPO).", "β", low_open=True, main=True,
                         refusal="{method} has no β; remove beta.")
    gamma_beta_ratio: float = _hyper(
        0.0, "γ/β: target margin over β (SimPO family).", "γ/β", note="0: no target margin", main=True,
        refusal="{method} has no target margin; remove gamma_beta_ratio/simpo_gamma or use simpo.")
    gamma: float = _hyper(0.0, "γ: absolute target margin of mean log-probs (RePO).", "γ", note="0: no margin",
                          main=True, refusal="{method} takes no absolute margin gamma; remove it (SimPO's margin "
                                             "is gamma_beta_ratio).")
    alpha: float = _hyper(0.0, "AlphaPO reward shape α (0: log-prob reward).", "AlphaPO α", low=None,
                          note="AlphaPO's reward shape; 0: the log-prob reward",
                          refusal="{method} has no reward-shape parameter; remove alpha.")
    label_smoothing: float = _hyper(
        0.0, "ε: assumed label-noise rate (sigmoid).", "label smoothing ε", high=0.5, high_open=True,
        note="at 0.5 chosen and rejected would count the same", nullable=False,
        refusal="label_smoothing applies to the sigmoid loss only; remove it or use loss_type sigmoid.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_objective(cls, objective) -> "Hyper":
        """The hyperparameters of a resolved objective (any object with these attributes)."""
        return cls(**{name: float(getattr(objective, name)) for name in cls.names()})


HYPERPARAMETERS = {f.name: f for f in dataclasses.fields(Hyper)}


def shaped_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape r = (1 - p^(-α)) / α with p = exp(logps); α = 0 gives r = log p.

    Written as -expm1(-α·log p)/α so that no probability is formed: p^(-α) would overflow for
    long sequences summed in log space.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _rewards(p: Pairs, h: Hyper) -> tuple[Tensor, Tensor]:
    return shaped_reward(p.chosen_logps.float(), h.alpha), shaped_reward(p.rejected_logps.float(), h.alpha)


def sigmoid_loss(p: Pairs, h: Hyper):
    """Bradley–Terry loss with an optional target margin (CPO eq. 3; SimPO eq. 6).

        L = -(1-ε)·log σ(β(r_w - r_l - γ/β)) - ε·log σ(-β(r_w - r_l - γ/β))

    With γ/β = 0 and summed log-probs this is CPO's preference term; with mean log-probs and
    γ/β > 0 it is SimPO (arXiv 2405.14734): "the reward of the winning response should exceed
    the losing one by at least γ". ε > 0 is the conservative (label-smoothed) variant.
    """
    r_w, r_l = _rewards(p, h)
    z = h.beta * ((r_w - r_l) - h.gamma_beta_ratio)
    losses = -F.logsigmoid(z) * (1 - h.label_smoothing) - F.logsigmoid(-z) * h.label_smoothing
    return losses, h.beta * r_w.detach(), h.beta * r_l.detach(), {}


def hinge_loss(p: Pairs, h: Hyper):
    """Hinge loss on the reward difference (SLiC, arXiv 2305.10425; SimPO's `hinge` variant).

        L = max(0, 1 - β(r_w - r_l - γ/β))

    Pairs already separated by more than 1/β + γ/β contribute nothing.
    """
    r_w, r_l = _rewards(p, h)
    losses = torch.relu(1 - h.beta * ((r_w - r_l) - h.gamma_beta_ratio))
    return losses, h.beta * r_w.detach(), h.beta * r_l.detach(), {}


def ipo_loss(p: Pairs, h: Hyper):
    """IPO's squared loss (arXiv 2310.12036, eq. 17), reference-free, β playing the role of τ.

        L = (r_w - r_l - 1/(2β))²

    It regresses the reward gap onto a fixed target instead of pushing it to infinity.
    """
    r_w, r_l = _rewards(p, h)
    losses = ((r_w - r_l) - 1 / (2 * h.beta)) ** 2
    return losses, h.beta * r_w.detach(), h.beta * r_l.detach(), {}


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation at either end (Mächler 2012).

    Near 0, 1 - exp(x) loses every digit, so use log(-expm1(x)); far below, exp(x) underflows
    harmlessly, so use log1p(-exp(x)). The switch at -ln 2 keeps both branches accurate.
    """
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(p: Pairs, h: Hyper):
    """ORPO's odds-ratio term (arXiv 2403.07691, eq. 7), weighted by λ (here `beta`).

        log odds(y) = log p(y) - log(1 - p(y))       with p the mean per-token probability
        L_OR        = -λ · log σ(log odds(y_w) - log odds(y_l))

    The NLL half of ORPO (over prompt and chosen completion) is added by `step.loss`, like
    every other NLL term. `extras` carries TRL's `log_odds_ratio` (log σ of the log-odds gap)
    and `log_odds_chosen` (the gap itself), per pair.

    A mean log-prob that rounds to exactly 0 (a completion the model is certain of) would give
    an infinite log-odds and NaN gradients; log-probs are capped at -1e-7 (p ≤ 0.9999999).
    """
    lw, ll = p.chosen_logps.float().clamp(max=-1e-7), p.rejected_logps.float().clamp(max=-1e-7)
    log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll))
    ratio = F.logsigmoid(log_odds)
    extras = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return -h.beta * ratio, h.beta * lw.detach(), h.beta * ll.detach(), extras


def simper_loss(p: Pairs, h: Hyper):
    """SimPER (arXiv 2502.00883): the inverse perplexities of the two completions, no hyperparameter.

        L = -exp(ℓ̄_w) + exp(ℓ̄_l)        ℓ̄ = mean log p over the completion's tokens

    exp(ℓ̄) = 1/perplexity lies in (0, 1], so each pair's loss lies in (-1, 1). The rewards
    logged are the mean log-probs themselves.
    """
    lw, ll = p.chosen_logps.float(), p.rejected_logps.float()
    return torch.exp(ll) - torch.exp(lw), lw.detach(), ll.detach(), {}


def repo_loss(p: Pairs, h: Hyper):
    """RePO (arXiv 2503.07426): SimPO's β → ∞ limit, a ReLU on the margin of mean log-probs.

        L = max(0, γ - (ℓ̄_w - ℓ̄_l))        γ absolute (`gamma`), no β

    Pairs already separated by γ contribute nothing; the others all get the same gradient
    weight. The rewards logged are the mean log-probs themselves.
    """
    lw, ll = p.chosen_logps.float(), p.rejected_logps.float()
    return torch.relu(h.gamma - (lw - ll)), lw.detach(), ll.detach(), {}


LossFn = Callable[[Pairs, Hyper], tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Loss:
    """One loss shape. `formula` is what `config explain` prints, with {r} the reward of a
    completion ({logp} its log-prob term) and {margin} the target-margin term; `smoothed`, for a
    shape that takes label smoothing, the formula with ε. `where` explains a symbol of it."""

    fn: LossFn
    formula: str
    smoothed: str | None = None
    where: str = ""
    uses: frozenset = frozenset()  # the hyperparameters fn reads
    optional: frozenset = frozenset()  # those a user may set with this shape whatever the method

    @property
    def takes_label_smoothing(self) -> bool:
        return "label_smoothing" in self.optional


_SHAPED = frozenset({"beta", "gamma_beta_ratio", "alpha"})

LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid_loss, "-log σ(β·({r}(y_w) - {r}(y_l){margin}))",
                    smoothed="(1-ε)·-log σ(β·({r}(y_w) - {r}(y_l){margin})) - ε·log σ(-β·({r}(y_w) - {r}(y_l){margin}))",
                    uses=_SHAPED | {"label_smoothing"}, optional=frozenset({"label_smoothing"})),
    "hinge": Loss(hinge_loss, "max(0, 1 - β·({r}(y_w) - {r}(y_l){margin}))", uses=_SHAPED),
    "ipo": Loss(ipo_loss, "({r}(y_w) - {r}(y_l) - 1/(2β))²", uses=frozenset({"beta", "alpha"})),
    "odds_ratio": Loss(odds_ratio_loss, "-λ·log σ(log odds(y_w) - log odds(y_l))",
                       where="log odds(y) = mean log p(y) - log(1 - exp(mean log p(y)))", uses=frozenset({"beta"})),
    "simper": Loss(simper_loss, "-exp({logp}(y_w)) + exp({logp}(y_l))"),
    "repo": Loss(repo_loss, "max(0, γ - ({logp}(y_w) - {logp}(y_l)))", uses=frozenset({"gamma"})),
}

# Which loss shapes take label smoothing (the others are not probabilistic).
SMOOTHABLE = frozenset(name for name, loss in LOSSES.items() if loss.takes_label_smoothing)


def formula(method: str, loss_type: str, h: Hyper) -> str:
    """The preference term of a resolved objective as a formula (with the hyperparameters it uses)."""
    loss, m = LOSSES[loss_type], METHODS[method]
    logp = "mean log p" if m.losses[loss_type] == "mean" else "log p"
    r = f"(1 - exp(-α·{logp}))/α" if h.alpha else logp
    margin = " - γ/β" if m.margin and h.gamma_beta_ratio else ""
    text = loss.smoothed if h.label_smoothing and loss.smoothed else loss.formula
    return text.format(r=r, logp=logp, margin=margin)


def takes(method: str, loss_type: str) -> frozenset:
    """The hyperparameters a user may set for this method with this loss shape."""
    return METHODS[method].takes | LOSSES[loss_type].optional


@dataclass(frozen=True)
class Method:
    """What a method needs. `losses` maps each allowed loss shape (the first is the default)
    to the log-prob reduction it is defined with: "sum" or "mean" over completion tokens.
    `defaults` holds every hyperparameter the method takes, with its published default, and the
    weight of its NLL term (`nll_weight`); the others stay at their neutral value."""

    title: str
    paper: str
    losses: dict[str, str]
    nll_span: str  # what the NLL term covers when nll_weight > 0: "completion" | "prompt+completion"
    defaults: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # a hyperparameter's name in this method's paper
    refusals: dict[str, str] = field(default_factory=dict)  # what a user who sets one it does not take is told
    # the published recipes' ranges, for the warnings before training (None: no advice)
    full_lr: tuple[float, float] | None = None  # learning rate for full fine-tuning
    beta_range: tuple[float, float] | None = None

    @property
    def takes(self) -> frozenset:
        """The hyperparameters a user may set for this method."""
        return frozenset(self.defaults) - {"nll_weight"}

    def value(self, name: str, given: float | None) -> float:
        """A hyperparameter as it resolves for this method: as given, else its default here, else neutral."""
        return float(self.defaults.get(name, HYPERPARAMETERS[name].default) if given is None else given)

    @property
    def margin(self) -> bool:  # accepts a target margin γ/β
        return "gamma_beta_ratio" in self.takes

    @property
    def reward_shape(self) -> bool:  # accepts AlphaPO's α
        return "alpha" in self.takes


def _simpo_family(title: str, paper: str, **defaults: float) -> Method:
    """SimPO and its variants: sigmoid or hinge on mean log-probs, a target margin, the published
    full-fine-tuning learning rates and β range."""
    return Method(title=title, paper=paper, losses={"sigmoid": "mean", "hinge": "mean"}, nll_span="completion",
                  defaults=defaults, full_lr=(3e-7, 1e-6), beta_range=(2.0, 10.0))


METHODS: dict[str, Method] = {
    "simpo": _simpo_family("SimPO", "arXiv 2405.14734", beta=2.0, gamma_beta_ratio=0.5, nll_weight=0.0, alpha=0.0),
    "cpo_simpo": _simpo_family("CPO-SimPO (SimPO + NLL on the chosen completion)",
                               "CPO_SIMPO repository; arXiv 2401.08417 + 2405.14734",
                               beta=10.0, gamma_beta_ratio=0.54, nll_weight=0.05, alpha=0.0),
    # α = 0.25 is the paper's recommended positive shape; β and γ/β follow SimPO.
    "alphapo": _simpo_family("AlphaPO (SimPO with a shaped reward)", "arXiv 2501.03884",
                             beta=2.0, gamma_beta_ratio=0.5, nll_weight=0.0, alpha=0.25),
    "cpo": Method(
        title="CPO",
        paper="arXiv 2401.08417",
        losses={"sigmoid": "sum", "hinge": "sum", "ipo": "mean"},
        nll_span="completion",
        defaults={"beta": 0.1, "nll_weight": 1.0, "alpha": 0.0},
        full_lr=(5e-7, 1e-6),
    ),
    "orpo": Method(
        title="ORPO",
        paper="arXiv 2403.07691",
        losses={"odds_ratio": "mean"},
        nll_span="prompt+completion",
        defaults={"beta": 0.1, "nll_weight": 1.0},
        labels={"beta": "λ (beta)"},
    ),
    "simper": Method("SimPER (inverse-perplexity preference, no hyperparameters)", "arXiv 2502.00883",
                     losses={"simper": "mean"}, nll_span="completion", defaults={"nll_weight": 0.0},
                     refusals={"label_smoothing": "simper has no label smoothing; remove label_smoothing."}),
    # γ = 0.6: the authors' released Llama-3-8B-Instruct recipe (their SimPO-derived trainer reads it
    # from gamma_beta_ratio as the absolute margin; β there only scales the logged rewards).
    "repo": Method("RePO (ReLU on the mean log-prob margin)", "arXiv 2503.07426", losses={"repo": "mean"},
                   nll_span="completion", defaults={"gamma": 0.6, "nll_weight": 0.0},
                   refusals={**{name: f"repo's only hyperparameter is the absolute margin gamma; remove {name} (the "
                                      "RePO repository's configs give that margin as gamma_beta_ratio: write it "
                                      "as gamma)." for name in ("beta", "gamma_beta_ratio")},
                             "label_smoothing": "repo has no label smoothing; remove label_smoothing."}),
}


def _check_tables():
    """The tables agree: every method's loss shapes exist and read the hyperparameters it takes,
    and its defaults name only hyperparameters (and nll_weight, which every method sets)."""
    for name, m in METHODS.items():
        unknown = set(m.defaults) - set(HYPERPARAMETERS) - {"nll_weight"}
        assert not unknown, f"METHODS[{name!r}].defaults: {sorted(unknown)} are not fields of Hyper"
        assert "nll_weight" in m.defaults, f"METHODS[{name!r}].defaults must set nll_weight"
        assert m.losses and set(m.losses.values()) <= {"sum", "mean"}, f"METHODS[{name!r}].losses"
        for shape in m.losses:
            assert shape in LOSSES, f"METHODS[{name!r}] names loss shape {shape!r}, not in LOSSES"
            ignored = m.takes - LOSSES[shape].uses
            assert not ignored, f"METHODS[{name!r}] takes {sorted(ignored)}, which loss {shape!r} ignores"
        assert set(m.labels) <= m.takes, f"METHODS[{name!r}].labels names a hyperparameter it does not take"
        assert not set(m.refusals) & m.takes, f"METHODS[{name!r}].refusals names a hyperparameter it takes"
        assert set(m.refusals) <= set(HYPERPARAMETERS), f"METHODS[{name!r}].refusals names an unknown key"


_check_tables()
