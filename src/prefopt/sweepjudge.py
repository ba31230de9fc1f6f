"""How a sweep judges its trials: the selection metrics, the guards and the choice (sweep.py's
docstring says what each means). The answers the guards and the generation metrics read are the
last evaluation's generations (`eval_generations.jsonl`) or, with `--prompts FILE`, the trial's
answers to those prompts as `prefopt eval` generates them (greedy, the saved chat template), with,
given `--reward_model DIR`, their mean reward and win rate over the base model's answers (a tie
counts half):

    output_dir/base_answers.json         the base model's answers, generated once for every trial
    output_dir/answers/TRIAL.json        each trial's answers and their metrics (a rerun reads them)
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

BASE_FILE, ANSWERS = "base_answers.json", "answers"
MAX_NEW_TOKENS = 256
METRICS = {  # name -> (key in metrics.jsonl or the generation metrics, direction)
    "accuracy": ("eval_rewards/accuracies", "maximize"),
    "eval_loss": ("eval_loss", "minimize"),
    "win_rate": ("win_rate", "maximize"),
    "mean_reward": ("mean_reward", "maximize"),
}


def _answers(model: str, prompts: list, budget: int) -> tuple[list[str], dict]:
    from .evaluation import Generator, generation_metrics

    generator = Generator(model, max_new_tokens=budget)
    answers = generator.answer(prompts, progress=False)
    return answers, generation_metrics(answers, generator.answer_ids)


def _budget(cfg) -> int:
    d = cfg.data
    return d.max_completion_length or (d.max_length // 2 if d.max_length else MAX_NEW_TOKENS)


def _cached(path: Path, model: str, prompts: list, budget: int) -> dict:
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("prompts") == prompts and saved.get("model") == model:
            return saved
    answers, metrics = _answers(model, prompts, budget)
    saved = {"model": model, "prompts": prompts, "answers": answers, "metrics": metrics}
    path.write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def judged_answers(plan, out: Path, cfg) -> dict:
    """The trial's generation metrics: repetition_rate, mean_length, empty_rate, and with a reward
    model mean_reward and win_rate (over the base model)."""
    from .evaluation import read_prompts, reward_scores, win_rates

    if not (out / "config.json").exists() and not (out / "adapter_config.json").exists():
        return {}  # no final model (the trial diverged)
    prompts = read_prompts(plan.options.prompts)
    budget = _budget(cfg)
    (plan.root / ANSWERS).mkdir(exist_ok=True)
    path = plan.root / ANSWERS / f"{out.name}.json"
    mine = _cached(path, str(out), prompts, budget)
    found = {k: mine["metrics"][k] for k in ("repetition_rate", "mean_length", "empty_rate")}
    if plan.options.reward_model:
        if "rewards" not in mine:
            base = _cached(plan.root / BASE_FILE, cfg.model.model_name_or_path, prompts, budget)
            scores = reward_scores(plan.options.reward_model, prompts,
                                   {"base": base["answers"], "trial": mine["answers"]})
            mine.update(rewards=scores["trial"], win_rate=win_rates(scores)["trial"])
            path.write_text(json.dumps(mine, indent=1) + "\n")
        found.update(mean_reward=statistics.fmean(mine["rewards"]), win_rate=mine["win_rate"])
    return found


def judge(plan, stage: int, settings: dict, cfg, error: str | None) -> dict:
    """A trial's record: its settings (every swept key), final held-out metrics, the guards' numbers
    and its status (ok, diverged, collapsed, degenerate); cfg is the trial's config."""
    from .losses import METHODS

    out = plan.trial_dir(settings)
    lines = _lines(out / "metrics.jsonl")
    evals = [x for x in lines if "eval_loss" in x]
    final = evals[-1] if evals else {}
    metrics = {k: v for k, v in final.items() if isinstance(v, (int, float)) and k.startswith("eval_")}
    per_token = METHODS[cfg.objective.method].losses[cfg.objective.loss_type] == "mean"
    drop = _chosen_drop(evals, per_token)
    if drop is not None:
        metrics["chosen_logp_drop"] = drop
    metrics.update(_generation_metrics(plan, out, cfg))
    status, reason = _status(metrics, error, bool(evals), plan.options)
    return {"name": out.name, "stage": stage, "settings": settings, "metrics": metrics,
            "status": status, "reason": reason, "output_dir": str(out)}


def _status(metrics: dict, error: str | None, evaluated: bool, options) -> tuple[str, str | None]:
    """ok, or the guard that marks the trial (never chosen) and why."""
    drop = metrics.get("chosen_logp_drop")
    if error is not None or any(isinstance(v, float) and not math.isfinite(v) for v in metrics.values()):
        return "diverged", error or "a held-out metric is not finite"
    if not evaluated:
        return "diverged", "no held-out metrics were logged"
    if drop is not None and drop > options.max_chosen_logp_drop:
        return "collapsed", (f"held-out chosen log-prob per token fell {drop:.2f} nats "
                             f"(> {options.max_chosen_logp_drop})")
    if metrics.get("repetition_rate", 0.0) > options.max_repetition:
        return "degenerate", f"repetition rate {metrics['repetition_rate']:.2f} (> {options.max_repetition})"
    return "ok", None


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _chosen_drop(evals: list[dict], per_token: bool) -> float | None:
    """How far the held-out chosen log-prob per token fell from the first evaluation to the last."""
    def per(line):
        logp, length = line.get("eval_logps/chosen"), line.get("eval_lengths/chosen")
        if logp is None or (not per_token and not length):
            return None
        return logp if per_token else logp / length

    if len(evals) < 2 or per(evals[0]) is None or per(evals[-1]) is None:
        return None
    return per(evals[0]) - per(evals[-1])


def _generation_metrics(plan, out: Path, cfg) -> dict:
    if plan.options.prompts:
        return judged_answers(plan, out, cfg)
    from .evalgen import GENERATIONS_FILE

    rows = _lines(out / GENERATIONS_FILE)
    if not rows:
        return {}
    last = [r for r in rows if r["step"] == rows[-1]["step"]]
    from transformers import AutoTokenizer

    from .evaluation import generation_metrics

    tokenizer = AutoTokenizer.from_pretrained(out if (out / "tokenizer_config.json").exists()
                                              else cfg.model.model_name_or_path)
    answers = [r["completion"] for r in last]
    tokens = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    found = generation_metrics(answers, tokens)
    return {k: found[k] for k in ("repetition_rate", "mean_length", "empty_rate")}


def choose(records: list[dict], metric: str) -> dict | None:
    """The best trial that no guard marked: by the metric, ties by held-out accuracy, then margin."""
    key, direction = METRICS[metric]
    sign = 1.0 if direction == "maximize" else -1.0
    fine = [r for r in records if r["status"] == "ok" and r["metrics"].get(key) is not None]
    if not fine:
        return None
    return max(fine, key=lambda r: (sign * r["metrics"][key], r["metrics"].get("eval_rewards/accuracies", 0.0),
                                    r["metrics"].get("eval_rewards/margins", 0.0)))
