"""From scored answers to pairs, and the report of what was kept (`prefopt pairs`).

A prompt's answers are candidates when they are not empty (training drops a pair with an empty
answer). `best_worst`: the highest-scored candidate is chosen and the lowest rejected (the first
of equals, in seed order); `best_random`: the highest chosen and, at random, one of those scored at
least `min_score_gap` lower rejected (seeded by the run's seed and the prompt's index); the
rejected answer is never the chosen one's text. A prompt yields no pair, counted by reason, when
its candidates are all the same text (`identical_answers`), no other text scores below the best
(`all_tie`), fewer than two (`fewer_than_two_answers`), or its best and worst are less than
`min_score_gap` apart (`gap_below_min`), or its best scores below `min_chosen_score` (`best_below_min`:
with a pass/fail scorer, 1 keeps only pairs whose chosen answer passed).
"""

from __future__ import annotations

import random
import statistics

from .sampling import derived_seed

DROP_REASONS = ("fewer_than_two_answers", "identical_answers", "all_tie", "gap_below_min", "best_below_min")


def choose(answers: list[str], scores: list[float], selection: str, min_gap: float,
           rng: random.Random, min_chosen: float | None = None) -> tuple[int, int] | str:
    """(chosen, rejected) indices, or the reason the prompt yields no pair."""
    live = [i for i, a in enumerate(answers) if a.strip()]
    if len(live) < 2:
        return "fewer_than_two_answers"
    if len({answers[i].strip() for i in live}) == 1:
        return "identical_answers"
    best = max(live, key=lambda i: (scores[i], -i))
    # never the chosen answer's own text again (a reward model can score one text a hair differently twice)
    others = [i for i in live if answers[i].strip() != answers[best].strip()]
    worst = min(others, key=lambda i: (scores[i], i))
    if scores[best] <= scores[worst]:
        return "all_tie"
    if scores[best] - scores[worst] < min_gap:
        return "gap_below_min"
    if min_chosen is not None and scores[best] < min_chosen:
        return "best_below_min"
    if selection == "best_random":
        worst = rng.choice([i for i in others if scores[best] - scores[i] >= min_gap and scores[i] < scores[best]])
    return best, worst


def _completion(prompt, text: str):
    """An answer in its prompt's format: chat prompts get an assistant message."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def build(cfg, prompts, records: list[dict], seeds: list[int]) -> tuple[list[dict], dict]:
    """The pairs file's rows and the report (counts, score and length statistics)."""
    p = cfg.pairs
    rows, drops = [], {r: 0 for r in DROP_REASONS}
    kept_tokens, all_scores = [], []
    for prompt, rec in zip(prompts, records):
        all_scores += rec["scores"]
        rng = random.Random(derived_seed(cfg.training.seed, rec["index"]))
        picked = choose(rec["answers"], rec["scores"], p.selection, p.min_score_gap, rng, p.min_chosen_score)
        if isinstance(picked, str):
            drops[picked] += 1
            continue
        c, r = picked
        kept_tokens.append((rec["tokens"][c], rec["tokens"][r]))
        rows.append({"prompt": prompt.prompt, "chosen": _completion(prompt.prompt, rec["answers"][c]),
                     "rejected": _completion(prompt.prompt, rec["answers"][r]),
                     "chosen_score": rec["scores"][c], "rejected_score": rec["scores"][r],
                     "all_scores": rec["scores"], "seeds": seeds, "chosen_seed": seeds[c],
                     "rejected_seed": seeds[r], "prompt_source": prompt.where})
    answers = [a for rec in records for a in rec["answers"]]
    stopped = [s for rec in records for s in rec["stopped"]]
    report = {
        "prompts": len(records), "answers": len(answers), "pairs": len(rows),
        "dropped": drops, "empty_answers": sum(not a.strip() for a in answers),
        "answers_cut_at_max_new_tokens": sum(not s for s in stopped),
        "selection": p.selection, "min_score_gap": p.min_score_gap, "min_chosen_score": p.min_chosen_score,
        "scores": {"all": _distribution(all_scores),
                   "chosen": _distribution([r["chosen_score"] for r in rows]),
                   "rejected": _distribution([r["rejected_score"] for r in rows]),
                   "gap": _distribution([r["chosen_score"] - r["rejected_score"] for r in rows])},
        "lengths": _lengths(kept_tokens),
    }
    return rows, report


def _distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": ordered[0], "p10": at(0.1), "p50": at(0.5), "p90": at(0.9), "max": ordered[-1]}


def _lengths(pairs: list[tuple[int, int]]) -> dict:
    """Chosen against rejected, in generated tokens; the length-only baseline is how often "pick the
    longer answer" names the chosen one (a tie counts half): far from 0.5, the scorer rewards length."""
    if not pairs:
        return {"pairs": 0}
    return {"pairs": len(pairs), "chosen_mean": statistics.fmean(c for c, _ in pairs),
            "rejected_mean": statistics.fmean(r for _, r in pairs),
            "chosen_longer": sum(c > r for c, r in pairs) / len(pairs),
            "equal_length": sum(c == r for c, r in pairs) / len(pairs),
            "length_baseline_accuracy": statistics.fmean(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pairs)}


def format_report(report: dict, output) -> list[str]:
    """The lines `prefopt pairs` prints at the end."""
    s, ln = report["scores"], report["lengths"]
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items() if v) or "none"
    lines = [
        f"prefopt pairs: {report['pairs']} pairs from {report['prompts']} prompts ({report['answers']} answers) "
        f"-> {output}",
        f"  prompts without a pair: {dropped}",
        f"  empty answers {report['empty_answers']}, cut at max_new_tokens {report['answers_cut_at_max_new_tokens']}",
    ]
    if s["all"]["n"]:
        lines.append(f"  scores, all answers: mean {s['all']['mean']:.4g}  p10 {s['all']['p10']:.4g}  "
                     f"p50 {s['all']['p50']:.4g}  p90 {s['all']['p90']:.4g}")
    if report["pairs"]:
        lines += [f"  chosen mean {s['chosen']['mean']:.4g}, rejected mean {s['rejected']['mean']:.4g}, gap mean "
                  f"{s['gap']['mean']:.4g} (p10 {s['gap']['p10']:.4g})",
                  f"  length (tokens): chosen {ln['chosen_mean']:.1f}, rejected {ln['rejected_mean']:.1f}; chosen "
                  f"longer in {ln['chosen_longer']:.0%}; length-only baseline {ln['length_baseline_accuracy']:.3f}"]
    lines.append(f"  report: {output.with_suffix('.report.json')}")
    return lines
