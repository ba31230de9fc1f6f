"""The files of a `prefopt pairs` run, and what a rerun may do with them.

    pairs.jsonl                 the pairs (what `prefopt train` reads)
    pairs.report.json           counts and statistics; what made the answers (`settings`) and the pairs
                                (`selection`), and the hashes of the two files beside it
    pairs.answers.jsonl         every answer of every prompt with its score: a new selection or
                                min_score_gap is made from it without sampling again
    pairs.jsonl.parts/          while running: settings.json and one batch-N.jsonl per finished batch

Written in this order, each file whole: the answers, the report, the pairs; then the parts are
removed. A kill at any point leaves a state a rerun of the same command finishes from, and a file
prefopt did not write (or one edited since) is never replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import file_hash, write_atomic
from .errors import PrefoptError

SETTINGS_FILE = "settings.json"
WRITER = "prefopt pairs"


def report_path(output: Path) -> Path:
    return output.with_suffix(".report.json")


def answers_path(output: Path) -> Path:
    return output.with_suffix(".answers.jsonl")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_file(parts: Path, batch: int) -> Path:
    return parts / f"batch-{batch:06d}.jsonl"


def _differ(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


def _report(output: Path) -> dict | None:
    """The report beside `output` if prefopt wrote it; None if there is none; refused if it is another file."""
    path = report_path(output)
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict) or report.get("written_by") != WRITER:
        raise PrefoptError(f"{path} exists and was not written by `prefopt pairs`; nothing was changed. Move it, or "
                           "set another output.")
    return report


def state(output: Path, settings: dict, selection: dict) -> tuple[str, dict | None]:
    """What a run of `settings` and `selection` does with what `output` holds:

    ("new", None)          nothing finished there: sample (resuming from the parts, if any)
    ("done", report)       finished with these settings: nothing to do
    ("reselect", report)   the answers are these settings', the pairs another selection's: re-select
    """
    report = _report(output)
    if report is None:
        if output.exists():
            raise PrefoptError(f"{output} exists and is not a `prefopt pairs` file (no report beside it); nothing was "
                               "changed. Set another output, or move the file.")
        return "new", None
    if output.exists() and file_hash(output) != report.get("output_hash"):
        raise PrefoptError(f"{output} was changed since `prefopt pairs` wrote it; nothing was changed. Set another "
                           "output, or move the file.")
    if report.get("settings") != settings:
        if output.exists():
            raise PrefoptError(f"{output} holds pairs made with other settings ({_differ(settings, report['settings'])} "
                               "differ); nothing was changed. Set another output, or delete it and its "
                               ".report.json/.answers.jsonl to make new ones.")
        return "new", None  # the report of a run stopped before its pairs file: it is made again
    answers = answers_path(output)
    if not answers.is_file() or file_hash(answers) != report.get("answers_hash"):
        raise PrefoptError(f"{answers} is missing or was changed since `prefopt pairs` wrote it, so the pairs cannot "
                           "be made again from it; delete the report to sample again, or set another output.")
    if output.exists() and report.get("selection") == selection:
        return "done", report
    return "reselect", report


def open_parts(output: Path, settings: dict, main: bool) -> Path:
    """The parts folder of this run: made by the main process (call it there first), checked by every
    process: an earlier run's with other settings, or a folder prefopt did not write, is refused."""
    parts = parts_dir(output)
    mark = parts / SETTINGS_FILE
    if mark.is_file():
        before = json.loads(mark.read_text())
        if before != settings and main and not any(parts.glob("batch-*.jsonl")):
            write_atomic(mark, json.dumps(settings, indent=1, sort_keys=True) + "\n")  # nothing sampled: nothing lost
        elif before != settings:
            raise PrefoptError(f"{parts} holds an earlier `prefopt pairs` run's answers made with other settings "
                               f"({_differ(settings, before)} differ); nothing was changed. Run with those settings "
                               f"to finish it, or delete {parts} to start afresh, or set another output.")
    elif parts.exists() and any(parts.iterdir()):
        raise PrefoptError(f"{parts} exists and was not written by `prefopt pairs` (no {SETTINGS_FILE}); nothing was "
                           "changed. Move it, or set another output.")
    elif main:
        parts.mkdir(parents=True, exist_ok=True)
        write_atomic(mark, json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return parts


def remove_parts(parts: Path, batches: int):
    """Only what `open_parts` and the batches wrote; anything else is left, and the folder with it."""
    for b in range(batches):
        done = part_file(parts, b)
        for path in (done, done.with_name(done.name + ".tmp")):  # and the half-written copy a kill left
            path.unlink(missing_ok=True)
    (parts / SETTINGS_FILE).unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:
        pass


def read_parts(parts: Path, batches: int, n: int) -> list[dict]:
    records = []
    for b in range(batches):
        path = part_file(parts, b)
        if not path.is_file():
            raise PrefoptError(f"{path} is missing after every process finished; rerun the same command to make it.")
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r["index"] for r in records] != list(range(n)):
        raise PrefoptError(f"{parts}: the parts do not cover the {n} prompts in order; delete {parts} and rerun.")
    return records


def read_answers(output: Path) -> list[dict]:
    return [json.loads(x) for x in answers_path(output).read_text(encoding="utf-8").splitlines() if x.strip()]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_result(output: Path, records: list[dict] | None, rows: list[dict], report: dict):
    """The answers (unless they are already there), the report, then the pairs: see the docstring."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if records is not None:
        write_atomic(answers_path(output), jsonl(records))
    pairs_text = jsonl(rows)
    tmp = output.with_name(f".{output.name}.new")
    write_atomic(tmp, pairs_text)  # hashed as written, then put in place after the report
    report.update(written_by=WRITER, output=str(output), output_hash=file_hash(tmp),
                  answers_hash=file_hash(answers_path(output)))
    write_atomic(report_path(output), json.dumps(report, indent=1) + "\n")
    tmp.replace(output)
