"""What a sweep shows: the table (printed and `sweep.md`), `sweep.json` and the PNGs.

    output_dir/sweep.json                 metric, swept values, stages, guards, `trials` (settings,
                                          metrics, status, output_dir) and `best` (the chosen settings)
    output_dir/sweep.md                   the same table in Markdown, the chosen settings first
    output_dir/plots/sweep_KEY.png        the metric against each swept key (a line per value of the
                                          other keys; guarded trials as crosses, the best as a star)
    output_dir/plots/sweep_curves.png     every trial's training loss and held-out metric over steps,
                                          on shared axes

`prefopt sweep --report DIR` draws them again from DIR/sweep.json and the trials' metrics.jsonl.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import PrefoptError

COLUMNS = (("eval acc", "eval_rewards/accuracies", "{:.3f}"), ("margin", "eval_rewards/margins", "{:.3g}"),
           ("eval loss", "eval_loss", "{:.4g}"), ("chosen drop", "chosen_logp_drop", "{:.3f}"),
           ("repetition", "repetition_rate", "{:.2f}"), ("win rate", "win_rate", "{:.3f}"),
           ("reward", "mean_reward", "{:.3g}"))


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def table(summary: dict) -> list[list[str]]:
    """The header and one row per trial; the chosen one marked *."""
    keys = list(summary["swept"])
    shown = [c for c in COLUMNS if any(c[1] in t["metrics"] for t in summary["trials"])]
    best = (summary.get("best") or {}).get("trial")
    rows = [["", "stage", *keys, "status", *[c[0] for c in shown]]]
    for t in summary["trials"]:
        rows.append(["*" if t["name"] == best else "", str(t["stage"]), *[f"{t['settings'][k]:g}" for k in keys],
                     t["status"], *[_cell(t["metrics"].get(c[1]), c[2]) for c in shown]])
    return rows


def text_table(summary: dict) -> str:
    rows = table(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown(summary: dict) -> str:
    rows = table(summary)
    best = summary.get("best")
    lines = [f"# prefopt sweep: {', '.join(summary['swept'])}", ""]
    if best:
        lines += [f"Chosen by {summary['metric']}: **{best['trial']}** ({best['output_dir']})", ""]
    else:
        lines += ["No trial chosen yet (or every one was guarded out).", ""]
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    marked = [t for t in summary["trials"] if t["status"] != "ok"]
    if marked:
        lines += ["", "Never chosen:", *[f"- {t['name']}: {t['status']} — {t['reason']}" for t in marked]]
    g = summary["guards"]
    lines += ["", f"Guards: collapsed when the held-out chosen log-prob per token fell more than "
                  f"{g['max_chosen_logp_drop']} nats; degenerate when the answers' repetition rate exceeded "
                  f"{g['max_repetition']}."]
    return "\n".join(lines) + "\n"


def write_report(root: Path, summary: dict, log=print) -> None:
    root = Path(root)
    (root / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    if log is None:
        return
    (root / "sweep.md").write_text(markdown(summary))
    pictures = draw(root, summary)
    best = summary.get("best")
    log("prefopt sweep: every trial (* chosen)\n" + text_table(summary))
    if best:
        log(f"prefopt sweep: chosen by {summary['metric']}: {best['trial']} ({best['output_dir']})")
    log(f"prefopt sweep: {root / 'sweep.json'}, {root / 'sweep.md'}, {len(pictures)} PNGs in {root / 'plots'}")


def redraw(folder: str) -> dict:
    """`prefopt sweep --report DIR`."""
    path = Path(folder) / "sweep.json"
    if not path.is_file():
        raise PrefoptError(f"{path}: not found; --report takes the output_dir of a `prefopt sweep`.")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrefoptError(f"{path}: not valid JSON ({e.msg}); run the sweep again to rewrite it.") from None
    write_report(Path(folder), summary)
    return summary


# -- pictures ---------------------------------------------------------------------------------

def _metric_key(summary: dict) -> str:
    from .sweepjudge import METRICS

    return METRICS[summary["metric"]][0]


def draw(root: Path, summary: dict) -> list[Path]:
    """The PNGs, as matplotlib Figures made without pyplot (as plots.py makes a run's)."""
    out = root / "plots"
    out.mkdir(exist_ok=True)
    figures = {f"sweep_{key}.png": _against(summary, key) for key in summary["swept"]}
    curves = _curves(summary)
    if curves is not None:
        figures["sweep_curves.png"] = curves
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)
    return [out / name for name in figures]


def _against(summary: dict, key: str):
    from matplotlib.figure import Figure

    metric = _metric_key(summary)
    others = [k for k in summary["swept"] if k != key]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    groups: dict = {}
    for t in summary["trials"]:
        groups.setdefault(tuple(t["settings"][k] for k in others), []).append(t)
    best = (summary.get("best") or {}).get("trial")
    for group, trials in groups.items():
        trials.sort(key=lambda t: t["settings"][key])
        ok = [t for t in trials if t["status"] == "ok" and _finite(t["metrics"].get(metric))]
        name = ", ".join(f"{k}={v:g}" for k, v in zip(others, group)) or summary["metric"]
        line = ax.plot([t["settings"][key] for t in ok], [t["metrics"][metric] for t in ok], "o-", label=name)[0]
        for t in trials:
            value = t["metrics"].get(metric)
            if t["status"] != "ok" and _finite(value):
                ax.plot(t["settings"][key], value, "x", color=line.get_color(), markersize=9)
                ax.annotate(t["status"], (t["settings"][key], value), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
            if t["name"] == best:
                ax.plot(t["settings"][key], value, "*", color="gold", markersize=16, markeredgecolor="black")
    values = summary["swept"][key]
    if min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (final, held out)")
    ax.set_title(f"{summary['metric']} against {key} (x: guarded out, star: chosen)")
    ax.legend(fontsize=8)
    return fig


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _curves(summary: dict):
    from matplotlib.figure import Figure

    from .plots import read_metrics, series

    metric = _metric_key(summary)
    metric = metric if metric.startswith("eval_") else "eval_rewards/accuracies"
    found = []
    for t in summary["trials"]:
        if (Path(t["output_dir"]) / "metrics.jsonl").is_file():
            lines = read_metrics(t["output_dir"])
            found.append((t, series(lines, "loss"), series(lines, metric)))
    if not found:
        return None
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for t, loss, held in found:
        line = top.plot(*loss, label=t["name"] + ("" if t["status"] == "ok" else f" ({t['status']})"))[0]
        bottom.plot(*held, "o:", color=line.get_color())
    top.set_ylabel("training loss")
    bottom.set_ylabel(f"{metric} (held out)")
    bottom.set_xlabel("optimizer step")
    top.set_title("every trial on the same axes")
    top.legend(fontsize=7)
    return fig
