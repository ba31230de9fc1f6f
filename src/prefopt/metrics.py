"""Logged metrics as sums: added per micro-batch on the device, reduced across processes when
logged, and carried across a resume.

Each metric is a `[sum, count]` pair per split ("train", "eval"); a logged value is sum / count
over every pair (or token) of every process since the last log, so no step pays for a host sync
and a logged value does not depend on how pairs fall into micro-batches or processes. The names
are TRL's (`rewards/*`, `logps/*`, `logits/*`, `nll_loss`, ORPO's `log_odds_*`), plus
`lengths/*`, `aux_loss` for MoE models and `diversity/*`.
"""

import math
from collections import defaultdict
from typing import Callable

import torch

from .step import EVAL_LOSS_PART, Scores, Step

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity on one)


class MetricSums:
    def __init__(self):
        self._sums = {"train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}

    def add(self, split: str, name: str, total, count):
        entry = self._sums[split][name]
        entry[0] = entry[0] + total.detach().double()
        entry[1] = entry[1] + count

    def names(self, split: str) -> list[str]:
        return sorted(self._sums[split])

    def record(self, split: str, step: Step, scores: Scores):
        """The metrics of one micro-batch."""
        K = scores.pairs
        per_pair = {
            "rewards/chosen": step.chosen_rewards,
            "rewards/rejected": step.rejected_rewards,
            "rewards/accuracies": (step.chosen_rewards > step.rejected_rewards).double(),
            "rewards/margins": step.chosen_rewards - step.rejected_rewards,
            "logps/chosen": step.pairs.chosen_logps,
            "logps/rejected": step.pairs.rejected_logps,
            **step.extras,
        }
        for name, values in per_pair.items():
            self.add(split, name, values.sum(), K)
        # TRL averages logits over every position of the padded batch; prefopt over the scored
        # completion tokens (the same thing without the layout's padding and prompt).
        tokens = scores.tokens
        self.add(split, "lengths/chosen", tokens[:K].sum(), K)  # completion tokens per response (after truncation)
        self.add(split, "lengths/rejected", tokens[K:].sum(), K)
        self.add(split, "logits/chosen", scores.logit_sum[:K].sum(), tokens[:K].sum())
        self.add(split, "logits/rejected", scores.logit_sum[K:].sum(), tokens[K:].sum())
        # TRL's nll_loss is the NLL term's value: 0 when the method has no NLL term.
        if step.nll is not None:
            self.add(split, "nll_loss", step.nll_sum, step.nll_tokens)
        else:
            self.add(split, "nll_loss", torch.zeros(()), 1)
        if scores.aux_loss is not None:
            self.add(split, "aux_loss", scores.aux_loss, 1)
        if scores.entropy_sum is not None:
            self.add(split, "diversity/entropy", scores.entropy_sum, scores.entropy_tokens)
            self.add(split, "diversity/kl", scores.kl_sum, scores.kl_positions)
        if split == "eval":  # eval_loss from sums over all pairs, like every other metric
            self.add(split, EVAL_LOSS_PART, step.losses.sum(), K)

    def means(self, split: str, reduce: Reduce, device) -> dict[str, float]:
        """Every metric of `split` over all processes since the last call; the sums start again."""
        names = self.names(split)
        if not names:
            return {}
        table = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                          for v in self._sums[split][n]]) for n in names])
        table = reduce(table)
        self._sums[split].clear()
        return {name: total / count if count else math.nan for name, (total, count) in zip(names, table.tolist())}

    def state(self, reduce: Reduce, device, extra: list[torch.Tensor]) -> tuple[dict, list[float]]:
        """The sums not yet logged, summed over processes (for a checkpoint), and `extra` scalars
        reduced in the same collective."""
        names = {split: self.names(split) for split in self._sums}
        values = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                  for split in names for n in names[split] for v in self._sums[split][n]]
        total = reduce(torch.stack(values + [e.double().reshape(()) for e in extra])).tolist()
        sums, i = {}, 0
        for split in names:
            sums[split] = {}
            for n in names[split]:
                sums[split][n] = total[i : i + 2]
                i += 2
        return sums, total[i:]

    def restore(self, saved: dict):
        """Put back what `state` returned (on one process only: the sums are already global)."""
        for split, entries in saved.items():
            self._sums[split].update({k: list(v) for k, v in entries.items()})
