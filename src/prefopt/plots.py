"""Pictures of a run: `prefopt plot OUTPUT_DIR` (also written at the end of every training run).

Reads `metrics.jsonl` and writes into `OUTPUT_DIR/plots/`:

    overview.png     every quantity the run logged, one panel each, titled with the run and its method
    loss.png, ...    each panel again on its own (`plotspec.PANELS` names them)

Train and held-out values share each panel, over optimizer steps. A train curve is smoothed
(`plotspec.smooth`) with its logged values drawn faint behind; held-out values are hollow
markers on a thin dotted line, so a gap between sparse evaluations does not read as data. A
series that is never logged or is 0 throughout (SimPO's NLL term) is not drawn, and a panel
with nothing to draw is left out. What is drawn where is decided in `plotspec`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import PrefoptError
from .plotspec import (EVAL, PANELS, Panel, RunInfo, finite, label, log_axis, run_info, smooth, smoothing_span,
                       worth_drawing)

OVERVIEW = "overview.png"
SINGLE_SIZE = (7, 4)  # inches at 100 dpi: one quantity's PNG
PANEL_SIZE = (5.2, 3.5)  # one overview panel
COLORS = {"chosen": "tab:blue", "rejected": "tab:red"}  # the same colours in every panel
OTHER_COLORS = ("tab:purple", "tab:green", "tab:orange")


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PrefoptError(f"{path}: not found; prefopt plot needs the output_dir of a training run.")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise PrefoptError(f"{path} line {number}: not valid JSON ({e.msg}).") from None
    return lines


def series(lines: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity in step order, finite values only; a step logged
    twice keeps its last value."""
    by_step = {}
    for line in lines:
        value, step = line.get(name), line.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(step, int):
            by_step[step] = float(value)
    points = finite(sorted(by_step.items()))
    return [p[0] for p in points], [p[1] for p in points]


def panel_series(lines: list[dict], panel: Panel) -> list[tuple[str, list[int], list[float]]]:
    """The series of `panel` worth drawing, each train metric followed by its held-out twin."""
    found = []
    for key in panel.keys:
        for name in (key, EVAL + key):
            steps, values = series(lines, name)
            if worth_drawing(values):
                found.append((name, steps, values))
    return found


def _color(panel: Panel, key: str) -> str:
    base = key.removeprefix(EVAL)
    for side, color in COLORS.items():
        if base.endswith("/" + side):
            return color
    return OTHER_COLORS[panel.keys.index(base) % len(OTHER_COLORS)]


def draw_panel(ax, panel: Panel, found: list, info: RunInfo, legend_size: float) -> None:
    """Draw `found` (from `panel_series`) on `ax`. Each line's gid is its metric (a train curve's
    faint logged values: the metric + ":logged"), so a test can tell what was drawn."""
    for key, steps, values in found:
        color, name = _color(panel, key), label(key, info)
        smoothed = panel.smoothed and not key.startswith(EVAL) and smoothing_span(len(values)) is not None
        if key.startswith(EVAL):
            ax.plot(steps, values, color=color, linestyle=":", linewidth=0.8, alpha=0.8, marker="o", markersize=5,
                    markerfacecolor="white", markeredgewidth=1.4, label=name, gid=key, zorder=3)
        elif smoothed:
            ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.25, label="_" + name, gid=key + ":logged")
            ax.plot(steps, smooth(values), color=color, linewidth=1.8, label=label(key, info, True), gid=key)
        else:
            ax.plot(steps, values, color=color, linewidth=1.5, marker="o" if len(values) == 1 else None,
                    markersize=4, label=name, gid=key)
    drawn = [v for _, _, values in found for v in values]
    if log_axis(panel, drawn):
        ax.set_yscale("log")
        _log_ticks(ax, drawn)
    ax.set_title(panel.title, fontsize=11)
    ax.set_ylabel(info.fill(panel.ylabel), fontsize=9)
    ax.tick_params(which="both", labelsize=8)
    ax.grid(alpha=0.3, which="major")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=legend_size, framealpha=0.8)


def _log_ticks(ax, values: list[float]) -> None:
    """Plain numbers on a log axis (0.05, 0.1, 0.2, not 5×10⁻²), the 2s and 5s between powers of
    ten labelled where the axis spans under three decades (beyond, they would crowd)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain if math.log10(max(values) / min(values)) < 3 else NullFormatter())


def figures(output_dir: str | Path):
    """The figures `plot_run` writes, by file name (overview.png first): matplotlib Figures,
    not yet saved, made without pyplot (no global state, no display needed)."""
    from matplotlib.figure import Figure

    lines = read_metrics(output_dir)
    info = run_info(output_dir)
    panels = [(panel, found) for panel in PANELS if (found := panel_series(lines, panel))]
    if not panels:
        raise PrefoptError(f"{Path(output_dir) / 'metrics.jsonl'} holds no logged metrics to plot yet.")
    out = {OVERVIEW: overview(panels, info, _last_step(lines))}
    for panel, found in panels:
        fig = Figure(figsize=SINGLE_SIZE, dpi=100, layout="constrained")
        ax = fig.add_subplot()
        draw_panel(ax, panel, found, info, legend_size=8)
        ax.set_xlabel("optimizer step", fontsize=9)
        fig.suptitle(info.title, fontsize=9, color="0.35")
        out[f"{panel.stem}.png"] = fig
    return out


def overview(panels: list, info: RunInfo, last_step: int | None):
    """Every panel on one figure, three to a row (two when there are at most four)."""
    from matplotlib.figure import Figure

    columns = 1 if len(panels) == 1 else 2 if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for i, (ax, (panel, found)) in enumerate(zip(axes, panels)):
        draw_panel(ax, panel, found, info, legend_size=7)
        if i + columns >= len(panels):  # the lowest panel of its column carries the step axis's name
            ax.set_xlabel("optimizer step", fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    steps = f" · {last_step} steps" if last_step is not None else ""
    fig.suptitle(f"{info.title}{steps}", fontsize=14, fontweight="bold")
    return fig


def _last_step(lines: list[dict]) -> int | None:
    steps = [line["step"] for line in lines if isinstance(line.get("step"), int)]
    return max(steps) if steps else None


def plot_run(output_dir: str | Path) -> dict[str, list[str]]:
    """Write the PNGs; for each file written, the metrics drawn in it."""
    folder = Path(output_dir) / "plots"
    built = figures(output_dir)
    folder.mkdir(exist_ok=True)
    written = {}
    for panel in PANELS:  # a picture of a quantity this run no longer shows is not left behind,
        stale = folder / f"{panel.stem}.png"  # if prefopt drew it: a file of the user's is never deleted
        if f"{panel.stem}.png" not in built and _drawn_by_prefopt(stale):
            stale.unlink()
    for name, fig in built.items():
        fig.savefig(folder / name, metadata={"Software": SOFTWARE})
        written[name] = [line.get_gid() for ax in fig.axes for line in ax.get_lines()
                         if line.get_gid() and not line.get_gid().endswith(":logged")]
    return written


SOFTWARE = "prefopt plot"  # the PNG's Software text, by which a later plot_run knows its own pictures


def _drawn_by_prefopt(png: Path) -> bool:
    try:
        with png.open("rb") as f:
            head = f.read(4096)  # matplotlib writes its text chunks before the image data
    except OSError:
        return False
    return b"Software\x00" + SOFTWARE.encode() in head
