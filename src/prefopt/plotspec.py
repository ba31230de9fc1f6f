"""What `prefopt plot` draws, decided without drawing: the panels, each metric's readable name,
when an axis is logarithmic, which series are left out, and how train curves are smoothed.

`plots` reads metrics.jsonl and draws with matplotlib; this module holds the rules, so they
read (and test) as plain functions. Every name says what the number is, as `metrics.py` and
`losses.py` compute it: a log-prob is the per-response value the objective uses (the mean over
the response's tokens for SimPO's family and ORPO, the sum for CPO), a reward is what the loss
compares (β times that log-prob, AlphaPO's shape of it, or the log-prob itself for SimPER and RePO).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

EVAL = "eval_"  # a held-out metric is its train metric's name with this prefix (the Trainer's)
LOG_SPAN = 30.0  # a log axis where every value is positive and the largest is over 30× the smallest
SMOOTH_SHARE = 25  # the EMA's span is 1/25 of the points (4% of the run); under 50 points, none


@dataclass(frozen=True)
class Panel:
    """One quantity: its own PNG (`plots/{stem}.png`) and one panel of the overview."""

    stem: str
    title: str
    ylabel: str
    keys: tuple[str, ...]  # the train metrics; each one's held-out twin is EVAL + key
    may_log: bool = False  # losses and norms, which can fall by decades; never rates, shares or log-probs
    smoothed: bool = True  # False for a schedule: the learning rate is set, not measured, so not noisy


PANELS = (
    Panel("loss", "Loss", "loss (objective total)", ("loss",), may_log=True),
    Panel("nll", "NLL term", "{nll}", ("nll_loss",), may_log=True),
    Panel("accuracies", "Preference accuracy", "share of pairs: chosen reward > rejected", ("rewards/accuracies",)),
    Panel("margins", "Reward margin", "chosen − rejected reward", ("rewards/margins",)),
    Panel("rewards", "Rewards", "reward = {reward}", ("rewards/chosen", "rewards/rejected")),
    Panel("logps", "Log-probabilities", "log p ({reduction})", ("logps/chosen", "logps/rejected")),
    Panel("log_odds", "ORPO log-odds gap", "log odds(chosen) − log odds(rejected)", ("log_odds_chosen",)),
    Panel("log_odds_ratio", "ORPO log σ(log-odds gap)", "log σ(gap) = −(odds-ratio term) / λ", ("log_odds_ratio",)),
    Panel("lengths", "Response lengths", "tokens per response", ("lengths/chosen", "lengths/rejected")),
    Panel("diversity", "Diversity term", "nats per position", ("diversity/entropy", "diversity/kl", "diversity/loss")),
    Panel("aux_loss", "MoE load-balancing loss", "router auxiliary loss", ("aux_loss",), may_log=True),
    Panel("grad_norm", "Gradient norm", "‖gradient‖ before clipping", ("grad_norm",), may_log=True),
    Panel("learning_rate", "Learning rate", "learning rate", ("learning_rate",), smoothed=False),
)

# metric → readable name; {reduction}, {nll} and {reward} are filled from the run's method
NAMES = {
    "loss": "loss",
    "nll_loss": "NLL term",
    "rewards/accuracies": "preference accuracy",
    "rewards/margins": "reward margin",
    "rewards/chosen": "chosen reward",
    "rewards/rejected": "rejected reward",
    "logps/chosen": "chosen log-prob ({reduction})",
    "logps/rejected": "rejected log-prob ({reduction})",
    "log_odds_chosen": "log-odds gap",
    "log_odds_ratio": "log σ(log-odds gap)",
    "lengths/chosen": "chosen length",
    "lengths/rejected": "rejected length",
    "diversity/entropy": "entropy of chosen",
    "diversity/kl": "KL(rejected ‖ chosen)",
    "diversity/loss": "diversity loss",
    "aux_loss": "MoE auxiliary loss",
    "grad_norm": "gradient norm",
    "learning_rate": "learning rate",
}

TRAIN_ONLY = {"learning rate", "gradient norm"}  # logged by the optimizer step alone
_DETAIL = re.compile(r" \([^()]*\)$")  # a name's closing " (detail)", which the split joins
REDUCTIONS = {"mean": "mean per token", "sum": "sum over the response"}


@dataclass(frozen=True)
class RunInfo:
    """What the titles and names need from the run's resolved config (prefopt_config.yaml)."""

    name: str  # run_name where one was set, else output_dir's folder name
    method: str | None = None  # None: the config is missing or unreadable
    loss_type: str | None = None
    reduction: str = "as the objective reduces it"
    nll: str = "NLL per token"
    reward: str = "β · log p"

    @property
    def title(self) -> str:
        if self.method is None:
            return f"{self.name} (method not recorded: no readable prefopt_config.yaml)"
        return f"{self.name} · {self.method} ({self.loss_type} loss)"

    def fill(self, text: str) -> str:
        return text.format(reduction=self.reduction, nll=self.nll, reward=self.reward)


def run_info(output_dir: str | Path) -> RunInfo:
    """The run's name and method, read as plain YAML (no config is built: a plot needs no model)."""
    import yaml

    out = Path(output_dir)
    try:
        saved = yaml.safe_load((out / "prefopt_config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    saved = saved if isinstance(saved, dict) else {}
    name = saved.get("run_name")
    name = str(name) if name and str(name) != str(saved.get("output_dir")) else out.resolve().name
    return _method_info(name, saved)


def _method_info(name: str, saved: dict) -> RunInfo:
    from .losses import METHODS

    method = saved.get("method")
    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        return RunInfo(name)
    loss_type = saved.get("loss_type") if saved.get("loss_type") in spec.losses else next(iter(spec.losses))
    reduction = spec.losses[loss_type]
    logp = "mean log p" if reduction == "mean" else "summed log p"
    alpha = saved.get("alpha") if isinstance(saved.get("alpha"), (int, float)) else spec.defaults.get("alpha", 0.0)
    if method in ("simper", "repo"):
        reward = logp
    elif method == "orpo":
        reward = f"λ · {logp}"
    else:
        reward = f"β · (1 − p^−α)/α, α = {alpha:g}" if alpha else f"β · {logp}"
    span = "prompt + chosen" if spec.nll_span == "prompt+completion" else "chosen response"
    return RunInfo(name, method, loss_type, REDUCTIONS[reduction], f"NLL per token ({span})", reward)


def label(key: str, info: RunInfo, smoothed: bool = False) -> str:
    """A metric's name in a legend: `eval_rewards/accuracies` → "preference accuracy (held-out)"."""
    held_out = key.startswith(EVAL)
    base = info.fill(NAMES.get(key.removeprefix(EVAL), key.removeprefix(EVAL)))
    where = "held-out" if held_out else "train, smoothed" if smoothed else "train"
    if base in TRAIN_ONLY:  # no held-out twin to tell apart from
        where = "smoothed" if smoothed else ""
    if not where:
        return base
    if _DETAIL.search(base):  # "chosen log-prob (mean per token)" → "chosen log-prob (mean per token, train)"
        return f"{base[:-1]}, {where})"
    return f"{base} ({where})"


def worth_drawing(values: list[float]) -> bool:
    """Not a series with nothing to show: no value, or every value 0 (SimPO's NLL term is logged as 0)."""
    return any(v != 0 for v in values)


def log_axis(panel: Panel, values: list[float]) -> bool:
    """A log y axis for a quantity that may fall by decades and here does: every value drawn is
    positive and the largest over LOG_SPAN times the smallest. Decided by the data, so a loss that
    moves within one decade keeps a linear axis its changes can be read on."""
    return panel.may_log and bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def smoothing_span(points: int) -> float | None:
    """The EMA's span for a train series of `points` values (None: drawn as logged). A span scaled
    to the run keeps a long run's curve readable and leaves a short one's points alone."""
    span = points / SMOOTH_SHARE
    return span if span >= 2 else None


def smooth(values: list[float]) -> list[float]:
    """An exponential moving average with weight 2/(span + 1) on each new value (pandas' `span`),
    debiased at the start (divided by the weight seen so far) so the curve does not rise from 0."""
    span = smoothing_span(len(values))
    if span is None:
        return list(values)
    new = 2 / (span + 1)
    mean = seen = 0.0
    out = []
    for v in values:
        mean = (1 - new) * mean + new * v
        seen = (1 - new) * seen + new
        out.append(mean / seen)
    return out


def finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points with a finite value (a window with nothing to average logs NaN)."""
    return [(s, v) for s, v in points if math.isfinite(v)]
