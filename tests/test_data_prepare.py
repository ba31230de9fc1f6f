"""What prefopt.data's prepare hands on: the report (its numbers, written and formatted), the chat
template it installs itself, and the datasets-cache key, which covers every module that shapes the
columns. The hand-written ids are those of data_helpers.words (its table in data_helpers.py)."""

import ast
import json
import shutil
from pathlib import Path

import datasets
import pytest

from data_helpers import NO_DROPS, PAIR, assistant, in_memory, tokenize, user, words, write_jsonl
from prefopt import fingerprint as fingerprint_mod
from prefopt.config import DataArgs, build_config
from prefopt.data import prepare, tokenize_pairs
from prefopt.errors import PrefoptError
from prefopt.fingerprint import DATA_MODULES, SOURCE, source_hash
from prefopt.report import format_report, write_report
from prefopt.rows import normalise
from prefopt.templates import setup_chat_template

datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------
# The report


REPORT_ROWS = [
    {"prompt": "how are you", "chosen": " fine thanks", "rejected": " go away"},  # 4 | 3 | 3
    {"prompt": "hi", "chosen": " fine", "rejected": " bad thanks you"},  # 2 | 2 | 4
    {"prompt": "how", "chosen": " fine thanks you are", "rejected": " go"},  # 2 | 5→4 (cap) | 2
    {"prompt": "hi", "chosen": "   ", "rejected": " bad"},  # dropped: blank
    {"prompt": "how are you hi hi", "chosen": " fine", "rejected": " bad"},  # 6 | 2→1 | 2→1 (max_length 7)
    {"prompt": "how are you how are you", "chosen": " fine", "rejected": " bad"},  # 7: dropped, nothing left
]


def expected_report(source: str) -> dict:
    return {
        "rows_in": 6,
        "kept": 4,
        "truncated": {"prompt": 0, "chosen": 2, "rejected": 1},
        "truncation": {"max_length": 7, "max_prompt_length": None, "max_completion_length": 4,
                       "truncation_mode": "keep_end"},
        "dropped": {**NO_DROPS, "empty_completion": 1, "truncated_to_nothing": 1},
        "dropped_rows": {"empty_completion": [f"{source} row 3"], "truncated_to_nothing": [f"{source} row 5"]},
        # kept lengths: prompt 4 2 2 6, chosen 3 2 4 1, rejected 3 4 2 1
        "lengths": {"prompt": {"p50": 2, "p90": 6, "p99": 6, "max": 6},
                    "chosen": {"p50": 2, "p90": 4, "p99": 4, "max": 4},
                    "rejected": {"p50": 2, "p90": 4, "p99": 4, "max": 4}},
        "chosen_longer_share": 0.25,  # only row 2
    }


def test_report_numbers():
    kept, report = tokenize(REPORT_ROWS, words(), max_length=7, max_completion_length=4)
    assert [r["row"] for r in kept] == [0, 1, 2, 4]
    assert kept[2]["chosen_ids"] == [11, 13, 10, 9]
    assert report == expected_report("mem[train]")


def test_prepare_writes_and_formats_the_report(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", REPORT_ROWS)
    cfg = build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(tmp_path / "out"),
                        "max_length": 7, "max_completion_length": 4, "max_dropped_share": 0.5,
                        "per_device_train_batch_size": 2})
    prepared = prepare(cfg, words())
    assert prepared.eval is None
    assert prepared.train.column_names == ["source", "row", "prompt_ids", "chosen_ids", "rejected_ids", "length"]
    assert prepared.train["length"] == [len(p) + len(c) + len(r) for p, c, r in
                                        zip(prepared.train["prompt_ids"], prepared.train["chosen_ids"], prepared.train["rejected_ids"])]
    assert prepared.train["row"] == [0, 1, 2, 4]
    assert prepared.report == {"train": expected_report(f"{path}[train]"), "eval": None}
    written = write_report(prepared.report, cfg.training.output_dir)
    assert json.loads(written.read_text()) == prepared.report
    assert format_report(prepared.report) == (
        "train: 4 of 6 pairs kept (dropped: 1 empty completion, 1 truncated to nothing)\n"
        "  truncated: prompt 0 (never cut: no max_prompt_length), chosen 2, rejected 1 (to max_length 7, "
        "max_completion_length 4)\n"
        "  tokens p50/p90/p99/max: prompt 2/6/6/6; chosen 2/4/4/4; rejected 2/4/4/4\n"
        "  chosen longer than rejected in 25.0% of pairs"
    )


def test_prepare_refuses_when_every_pair_is_dropped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", REPORT_ROWS[5:])
    cfg = build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(tmp_path / "out"),
                        "max_length": 7})
    with pytest.raises(PrefoptError, match="every train pair was dropped.*raise max_length"):
        prepare(cfg, words())


# ---------------------------------------------------------------------------------------------
# The chat template, installed by prepare


def test_prepare_installs_the_chat_template_and_installing_it_first_changes_nothing(tmp_path):
    rows = [{"prompt": [user("hi")], "chosen": [assistant("fine")], "rejected": [assistant("bad")]}]
    cfg = build_config({"datasets": [{"path": write_jsonl(tmp_path / "d.jsonl", rows)}], "method": "simpo",
                        "output_dir": str(tmp_path / "out"), "chat_template": "chatml",
                        "per_device_train_batch_size": 1})
    tokenizer = words()  # no chat template of its own: prepare must install ChatML to render the rows
    alone = prepare(cfg, tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    before = words()
    assert setup_chat_template(before, "chatml") is False  # its ChatML tokens are already special
    after_setup = prepare(cfg, before)
    for prepared in (alone, after_setup):
        # <s> <|im_start|> user hi <|im_end|> <|im_start|> assistant | fine <|im_end|> (eos, not doubled)
        assert prepared.train["prompt_ids"] == [[1, 3, 5, 7, 4, 3, 6]]
        assert prepared.train["chosen_ids"] == [[11, 4]] and prepared.train["rejected_ids"] == [[12, 4]]
    assert len(before) == len(tokenizer) and before.chat_template == tokenizer.chat_template


# ---------------------------------------------------------------------------------------------
# The datasets cache key covers every module that shapes the columns

PACKAGE = Path(fingerprint_mod.__file__).parent
NOT_DATA = {"config", "errors"}  # config's values enter the keys as options; errors shape no column


def imported_modules(name: str) -> set[str]:
    """The prefopt modules `name` imports, read from its source (imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefopt."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("prefopt.")}
    return found


def test_every_module_data_imports_is_hashed_into_the_cache_key():
    reached, todo = set(), ["data"]
    while todo:
        name = todo.pop()
        reached.add(name)
        todo += sorted(imported_modules(name) - reached - NOT_DATA)
    assert reached == set(DATA_MODULES)
    assert {"sources", "rows", "templates", "tokens", "report"} <= reached  # the walk follows imports


def test_a_change_to_any_data_module_changes_the_cache_keys(tmp_path, monkeypatch):
    for name in DATA_MODULES:
        shutil.copy(PACKAGE / f"{name}.py", tmp_path)
    assert source_hash(tmp_path) == SOURCE
    changed = {}
    for name in DATA_MODULES:
        path = tmp_path / f"{name}.py"
        original = path.read_bytes()
        path.write_bytes(original + b"\n# a changed helper\n")
        changed[name] = source_hash(tmp_path)
        path.write_bytes(original)
    assert source_hash(tmp_path) == SOURCE  # the copies are back as they were: each change was the only one
    assert SOURCE not in changed.values() and len(set(changed.values())) == len(DATA_MODULES)
    # and that hash is in the key of every map: the tokenized columns are not taken from the cache
    ds = normalise(in_memory([PAIR]))
    before = tokenize_pairs(ds, words(), DataArgs())[0]._fingerprint
    monkeypatch.setattr(fingerprint_mod, "SOURCE", changed["tokens"])
    assert tokenize_pairs(ds, words(), DataArgs())[0]._fingerprint != before
