"""The data report: per split, the pairs read and kept, drops by reason, truncation, token lengths.

    report = split_report(marks, cfg.data)               # marks: `tokens.tokenize`'s table of every row
    check_dropped("train", report, cfg.data.max_dropped_share)
    print(format_report({"train": report, "eval": None}))
    write_report({"train": report, "eval": None}, cfg.training.output_dir)   # data_report.json

In (`split_report`): the pyarrow Table of every tokenized row of one split (`tokens.tokenize`):
`prompt_ids`, `chosen_ids`, `rejected_ids` (list<int>), `drop` (str, "" for a kept pair, else its
reason), `prompt_truncated`, `chosen_truncated`, `rejected_truncated` (bool), `source`, `row`.
Out: a JSON-able dict per split (its keys: `split_report`; `data.tokenize_pairs` adds `notes`, a list
of lines about the run's rendering, when there are some, and `format_report` prints each once). No
column is made or changed here.
`check_dropped` refuses a split with nothing left or more than `max_dropped_share` dropped.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from .config import DataArgs
from .errors import PrefoptError
from .rows import PAIR
from .tokens import DROP_FIXES, DROP_REASONS


def check_dropped(split: str, report: dict, max_share: float):
    """Refuse a split with nothing left, or with more than `max_share` of its rows dropped."""
    dropped = sum(report["dropped"].values())
    share = dropped / max(report["rows_in"], 1)
    if report["kept"] and share <= max_share:
        return
    reasons = "; ".join(f"{n} {reason.replace('_', ' ')} (e.g. {', '.join(report['dropped_rows'][reason][:3])}): "
                        f"{DROP_FIXES[reason]}" for reason, n in report["dropped"].items() if n)
    if not report["kept"]:
        head = f"every {split} pair was dropped"
    else:
        head = (f"{split}: {dropped} of {report['rows_in']} pairs were dropped ({share:.1%}, more than "
                f"max_dropped_share {max_share:g})")
    raise PrefoptError(f"{head}. {reasons}. Or set max_dropped_share (now {max_share:g}) to train on what is left.")


def split_report(table, data: DataArgs) -> dict:
    """rows_in, kept, truncated (kept pairs whose part was cut) and the truncation settings, dropped
    by reason with every dropped row (`dropped_rows`: reason → 'source row N', all of them; what is
    printed names the first few), token lengths (p50/p90/p99/max) of kept pairs, and the share of
    kept pairs whose chosen is the longer answer."""
    kept = table.filter(pc.equal(table["drop"], ""))
    lengths = {name: pc.list_value_length(kept[f"{name}_ids"]).to_numpy(zero_copy_only=False) for name in PAIR}
    reasons = Counter(table["drop"].to_pylist())
    return {
        "rows_in": table.num_rows,
        "kept": kept.num_rows,
        "truncated": {name: int(kept[f"{name}_truncated"].to_numpy(zero_copy_only=False).sum()) for name in PAIR},
        "truncation": {key: getattr(data, key) for key in
                       ("max_length", "max_prompt_length", "max_completion_length", "truncation_mode")},
        "dropped": {reason: reasons[reason] for reason in DROP_REASONS},
        "dropped_rows": {reason: _dropped_rows(table, reason) for reason in DROP_REASONS if reasons[reason]},
        "lengths": {name: _percentiles(lengths[name]) for name in PAIR},
        "chosen_longer_share": float(np.mean(lengths["chosen"] > lengths["rejected"])) if kept.num_rows else None,
    }


def _dropped_rows(table, reason: str) -> list[str]:
    """Where every pair dropped for `reason` came from, in the split's order: 'data.jsonl[train] row 7'."""
    rows = table.filter(pc.equal(table["drop"], reason)).select(["source", "row"]).to_pylist()
    return [f"{r['source']} row {r['row']}" for r in rows]


def _percentiles(lengths: np.ndarray) -> dict | None:
    if len(lengths) == 0:
        return None
    # inverted_cdf: the smallest length that q% of pairs do not exceed (a real length, not an interpolation)
    return {**{f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in (50, 90, 99)},
            "max": int(lengths.max())}


def write_report(report: dict, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "data_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_report(report: dict) -> str:
    """A few lines per split, as `train` prints them."""
    lines = []
    for split, r in report.items():
        if r is None:
            continue
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in r["dropped"].items() if n) or "none"
        t, policy = r["truncated"], r["truncation"]
        prompt_rule = (f"to max_prompt_length {policy['max_prompt_length']}, {policy['truncation_mode']}"
                       if policy["max_prompt_length"] else "never cut: no max_prompt_length")
        lines += [f"{split}: {r['kept']} of {r['rows_in']} pairs kept (dropped: {dropped})",
                  f"  truncated: prompt {t['prompt']} ({prompt_rule}), chosen {t['chosen']}, rejected "
                  f"{t['rejected']} (to max_length {policy['max_length']}, max_completion_length "
                  f"{policy['max_completion_length']})"]
        if r["kept"]:
            lengths = "; ".join(f"{name} " + "/".join(str(v) for v in r["lengths"][name].values()) for name in PAIR)
            lines += [f"  tokens p50/p90/p99/max: {lengths}",
                      f"  chosen longer than rejected in {r['chosen_longer_share']:.1%} of pairs"]
    # a note about the run's rendering is the same for every split: said once
    notes = dict.fromkeys(n for r in report.values() if r is not None for n in r.get("notes", ()))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
