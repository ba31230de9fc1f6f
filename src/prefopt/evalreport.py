"""What `prefopt eval` prints and stores: the metrics table, a few prompts' answers side by side,
and the per-prompt records of the JSON report.

    report["generations"] = generation_records(conversations, answers, tokens, rewards)
    print(format_report(report))      # the table, then the first prompts' answers model by model

The terminal shows a preview (the first `SHOWN_PROMPTS` prompts, each answer wrapped to the
terminal's width and cut after `SHOWN_LINES` lines); the report keeps every answer in full.
"""

import shutil
import textwrap

SHOWN_PROMPTS = 3
SHOWN_LINES = 4
LENGTH_UNIT = "generated tokens, up to and excluding the stopping EOS (at most max_new_tokens)"


def generation_records(conversations: list[list[dict]], answers: dict[str, list[str]],
                       tokens: dict[str, list[list[int]]], rewards: dict[str, list[float]] | None) -> list[dict]:
    """One record per prompt: its last message's text, the whole conversation, each model's answer,
    its length in generated tokens and, given a reward model, its reward."""
    records = []
    for i, conversation in enumerate(conversations):
        record = {"prompt": conversation[-1]["content"], "messages": conversation,
                  "answers": {n: answers[n][i] for n in answers},
                  "answer_tokens": {n: len(tokens[n][i]) for n in tokens}}
        if rewards is not None:
            record["rewards"] = {n: rewards[n][i] for n in rewards}
        records.append(record)
    return records


def _one_line(text: str) -> str:
    """The text on one line: a line break shown as ⏎, runs of spaces as one, and any other control
    character (an untrained model emits them) as ·, so that none moves the terminal's cursor."""
    line = " ⏎ ".join(" ".join(line.split()) for line in text.strip().splitlines())
    return "".join(c if c.isprintable() else "·" for c in line)


def _wrapped(text: str, width: int, lines: int) -> list[str]:
    """`text` wrapped to `width`, cut to `lines` lines, the last ending in … where something was cut."""
    wrapped = textwrap.wrap(_one_line(text), width, break_long_words=True, break_on_hyphens=False) or ["(empty)"]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return wrapped


def generations_block(records: list[dict], width: int | None = None) -> str:
    """The first prompts, each followed by every model's answer, labelled, wrapped to `width`
    (default: the terminal's), with its reward where the report has one."""
    width = max(40, min(width or shutil.get_terminal_size((100, 24)).columns, 160))
    shown = records[:SHOWN_PROMPTS]
    lines = textwrap.wrap(f"answers to the first {len(shown)} of {len(records)} prompts (all of them, in full: "
                          "the --output report's `generations`):", width)
    for i, record in enumerate(shown, 1):
        lines.append("")
        lines += _wrapped(f"[{i}] {record['prompt']}", width, 2)
        labels = {n: n + (f" (reward {record['rewards'][n]:.3g})" if "rewards" in record else "")
                  for n in record["answers"]}
        pad = max(map(len, labels.values()))
        text_width = max(20, width - pad - 5)
        for name, answer in record["answers"].items():
            for j, line in enumerate(_wrapped(answer, text_width, SHOWN_LINES)):
                lines.append(f"  {labels[name] if j == 0 else '':<{pad}} │ {line}")
    return "\n".join(lines)


def _rows(report: dict, names: list[str]) -> list[tuple[str, list]]:
    rows: list[tuple[str, list]] = []
    if "preference" in report:
        p = report["preference"]
        rows += [("pairs", [p[n]["pairs"] for n in names]),
                 ("preference accuracy", [p[n]["accuracy"] for n in names]),
                 ("length-only baseline accuracy", [p[n]["length_baseline_accuracy"] for n in names]),
                 ("margin mean", [p[n]["margin"]["mean"] for n in names]),
                 ("margin p10 / p50 / p90", ["{p10:.3g} / {p50:.3g} / {p90:.3g}".format(**p[n]["margin"]) for n in names]),
                 ("log p chosen / rejected", [f"{p[n]['logps_chosen']:.4g} / {p[n]['logps_rejected']:.4g}" for n in names]),
                 ("length chosen / rejected", [f"{p[n]['length_chosen']:.1f} / {p[n]['length_rejected']:.1f}" for n in names])]
    if "generation" in report:
        g = report["generation"]
        rows += [(label, [g[n][key] for n in names]) for label, key in (
            ("answers", "answers"), ("mean answer length (generated tokens)", "mean_length"),
            ("longest answer (generated tokens)", "max_length"), ("next-token entropy (nats)", "entropy"),
            ("repetition rate (3-grams)", "repetition_rate"), ("distinct-1", "distinct_1"),
            ("distinct-2", "distinct_2"), ("empty answers", "empty_rate"))]
        if all("mean_reward" in g[n] for n in names):
            rows.append(("mean reward", [g[n]["mean_reward"] for n in names]))
    for key, value in report.items():
        if key.startswith("win_rate_over_"):
            rows.append((key.replace("_", " "), ["—"] + [value[n] for n in names[1:]]))
    return rows


def format_report(report: dict, width: int | None = None) -> str:
    """The metrics, one column per model; then, with generations, the first prompts' answers."""
    names = list(report["models"])
    rows = _rows(report, names)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    label_width = max(len(r[0]) for r in rows) if rows else 10
    lines = [" " * label_width + "  " + "  ".join(f"{n:>22}" for n in names)]
    lines += [f"{label:<{label_width}}  " + "  ".join(f"{fmt(v):>22}" for v in values) for label, values in rows]
    if report.get("generations"):
        lines += ["", generations_block(report["generations"], width)]
    return "\n".join(lines)
