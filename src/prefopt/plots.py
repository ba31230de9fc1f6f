"""Pictures of a run: `prefopt plot OUTPUT_DIR` (also written at the end of every training run).

Reads `metrics.jsonl` and writes one PNG per quantity into `OUTPUT_DIR/plots/`, train and eval
on the same axes over optimizer steps: loss, NLL, rewards of chosen and rejected, margins,
preference accuracy, log-probs, response lengths, learning rate (and ORPO's log-odds).
"""

import json
from pathlib import Path

from .errors import PrefoptError

# file name → (title, y label, train series); each series' eval twin is `eval_` + its name
FIGURES = {
    "loss": ("Loss", "loss", ["loss"]),
    "nll": ("NLL term", "NLL per token", ["nll_loss"]),
    "rewards": ("Rewards", "reward", ["rewards/chosen", "rewards/rejected"]),
    "margins": ("Reward margin (chosen − rejected)", "margin", ["rewards/margins"]),
    "accuracies": ("Preference accuracy", "share of pairs with chosen ahead", ["rewards/accuracies"]),
    "logps": ("Log-probabilities of the responses", "log p (as the objective reduces it)",
              ["logps/chosen", "logps/rejected"]),
    "lengths": ("Response lengths", "tokens", ["lengths/chosen", "lengths/rejected"]),
    "learning_rate": ("Learning rate", "learning rate", ["learning_rate"]),
    "log_odds": ("ORPO log-odds", "value", ["log_odds_ratio", "log_odds_chosen"]),
}


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
    """(steps, values) of one logged quantity, in order of logging."""
    points = [(line["step"], line[name]) for line in lines
              if isinstance(line.get(name), (int, float)) and "step" in line]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_run(output_dir: str | Path) -> dict[str, list[str]]:
    """Write the PNGs; for each file written, the names of the series drawn in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(output_dir)
    folder = Path(output_dir) / "plots"
    folder.mkdir(exist_ok=True)
    written = {}
    for stem, (title, ylabel, names) in FIGURES.items():
        drawn = []
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for name in names:
            for label, key, style in ((name, name, "-"), (f"eval {name}", f"eval_{name}", "o--")):
                steps, values = series(lines, key)
                if steps:
                    ax.plot(steps, values, style, label=label, markersize=4)
                    drawn.append(key)
        if drawn:
            ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(folder / f"{stem}.png")
            written[f"{stem}.png"] = drawn
        plt.close(fig)
    if not written:
        raise PrefoptError(f"{Path(output_dir) / 'metrics.jsonl'} holds no logged metrics to plot yet.")
    return written
