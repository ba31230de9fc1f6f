"""Warnings for settings users regret, before training and while it runs.

Before: a learning rate above the published full-fine-tuning range (SimPO, CPO-SimPO, AlphaPO,
CPO; LoRA is exempt, it wants larger rates), SimPO-family β below 1, an effective batch far from
the papers' 128. While training: a preference accuracy above 0.8 before any update, on enough
pairs that chance would rarely give it (`TELL_PAIRS`; the data has a tell the model reads without
learning anything), and chosen log-probs falling steadily
(likelihood displacement: margins can grow while the chosen answers themselves become less
likely). Warnings never stop a run.
"""

from transformers import TrainerCallback

from .config import Config

import math

PAPER_BATCH = 128
TELL_ACCURACY = 0.8
DISPLACEMENT_WINDOW = 10  # logged steps compared


def _by_chance(pairs: int) -> float:
    """The chance that a model with no preference (each pair a fair coin) scores above TELL_ACCURACY
    on `pairs` pairs: the binomial tail P(K > 0.8·n | n, 1/2)."""
    k = math.floor(TELL_ACCURACY * pairs) + 1
    return sum(math.comb(pairs, i) for i in range(k, pairs + 1)) / 2 ** pairs


# The fewest pairs on which an accuracy above 0.8 says more than chance: below one in a thousand
# (5 of 5 pairs happens by chance 1 time in 32, 9 of 10 1 time in 93; from 27 pairs on, under 1 in 1,000).
TELL_PAIRS = next(n for n in range(1, 200) if all(_by_chance(m) < 1e-3 for m in range(n, n + 20)))


def before_training(cfg: Config, world_size: int = 1) -> list[str]:
    o, t, method = cfg.objective, cfg.training, cfg.method
    out = []
    if method.full_lr and not cfg.model.use_peft and t.learning_rate > method.full_lr[1] * 1.01:
        low, high = method.full_lr
        out.append(f"learning_rate {t.learning_rate:g} is above what {method.title} recipes use for full "
                   f"fine-tuning ({low:g}–{high:g}); higher rates tend to collapse the model into repetitive or "
                   "empty answers. (With use_peft, larger rates are normal.)")
    if method.beta_range and o.beta < 1:
        low, high = method.beta_range
        out.append(f"beta {o.beta:g} is below 1: {method.title} scales length-normalised log-probs by β, and the "
                   f"papers' values are {low:g}–{high:g} (2–2.5 for most models); with a small β the margin γ "
                   "dominates and rewards barely separate.")
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    if not PAPER_BATCH / 4 <= batch <= PAPER_BATCH * 4:
        out.append(f"effective batch {batch} (per_device_train_batch_size × gradient_accumulation_steps × "
                   f"processes) is far from the papers' {PAPER_BATCH}; the recommended learning rates assume it. "
                   "Adjust gradient_accumulation_steps, or re-tune the learning rate.")
    return out


class GuidanceCallback(TrainerCallback):
    """Watches the logged metrics; each warning is given once."""

    def __init__(self, warn):
        self.warn = warn
        self.given: set[str] = set()
        self.chosen: list[float] = []

    def _once(self, key: str, message: str):
        if key not in self.given:
            self.given.add(key)
            self.warn(message)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        # the first train line's metrics come from the forward before the first update
        first_train = "rewards/accuracies" in logs and not self.chosen
        at_start = "eval_rewards/accuracies" in logs and state.global_step == 0
        accuracy = logs.get("rewards/accuracies") if first_train else logs.get("eval_rewards/accuracies")
        pairs = _train_pairs(args, state) if first_train else _eval_pairs(kwargs.get("eval_dataloader"))
        if (first_train or at_start) and accuracy is not None and accuracy > TELL_ACCURACY and pairs >= TELL_PAIRS:
            self._once("tell", f"preference accuracy is {accuracy:.2f} before any training: the model already "
                               "prefers the chosen answers, so the data likely has a tell (length, format, a "
                               "phrase) that the objective will exploit. Check data_report.json (how often chosen "
                               "is longer) and a few pairs by hand.")
        if "logps/chosen" in logs:
            self.chosen.append(logs["logps/chosen"])
            recent = self.chosen[-DISPLACEMENT_WINDOW:]
            if len(recent) == DISPLACEMENT_WINDOW:
                falls = sum(b < a for a, b in zip(recent, recent[1:]))
                drop = recent[0] - recent[-1]
                if falls >= 0.7 * (len(recent) - 1) and drop > 0.1 * abs(recent[0]):
                    self._once("displacement", f"logps/chosen fell in {falls} of the last {len(recent) - 1} logged "
                                               f"steps ({recent[0]:.3g} → {recent[-1]:.3g}): the chosen answers are "
                                               "becoming less likely even as the margin grows (likelihood "
                                               "displacement). A lower learning rate, or an NLL term "
                                               "(nll_weight, as CPO-SimPO), counters it.")


def _train_pairs(args, state) -> int:
    """The pairs behind the first logged train line: every pair of the steps it averages."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return per_step * max(state.global_step, 1)


def _eval_pairs(loader) -> int:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else 0
