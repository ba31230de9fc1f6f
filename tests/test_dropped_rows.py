"""data_report.json lists every dropped row with its source, row and reason; what is printed (the
summary, the max_dropped_share refusal) stays short."""

import json

import datasets
import pytest

from data_helpers import PAIR, words, write_jsonl
from prefopt.config import build_config
from prefopt.data import prepare
from prefopt.errors import PrefoptError
from prefopt.report import format_report, write_report

datasets.disable_progress_bars()

OTHERS = [{"prompt": "hi", "chosen": " fine", "rejected": " bad"},
          {"prompt": "how", "chosen": " fine thanks", "rejected": " go"},
          {"prompt": "you", "chosen": " thanks", "rejected": " away"}]
# row 0 kept, its 5 repeats (rows 1, 2, 4, 6, 7) dropped, rows 3, 5, 8 kept
ROWS = [PAIR, PAIR, PAIR, OTHERS[0], PAIR, OTHERS[1], PAIR, PAIR, OTHERS[2]]


def cfg_for(tmp_path, **keys):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    return path, build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(tmp_path / "out"),
                               "per_device_train_batch_size": 1, **keys})


def test_every_duplicate_is_listed_in_the_json(tmp_path):
    path, cfg = cfg_for(tmp_path, max_dropped_share=0.6)
    prepared = prepare(cfg, words())
    written = json.loads(write_report(prepared.report, cfg.training.output_dir).read_text())
    assert written["train"]["dropped"]["duplicate_pair"] == 5
    assert written["train"]["dropped_rows"] == {"duplicate_pair": [f"{path}[train] row {i}" for i in (1, 2, 4, 6, 7)]}
    assert prepared.train["row"] == [0, 3, 5, 8]
    # the printed summary counts them, without the list
    assert f"{path}[train] row" not in format_report(prepared.report)
    assert "(dropped: 5 duplicate pair)" in format_report(prepared.report)


def test_the_refusal_names_the_first_three(tmp_path):
    path, cfg = cfg_for(tmp_path, max_dropped_share=0.5)
    with pytest.raises(PrefoptError) as refused:
        prepare(cfg, words())
    assert str(refused.value) == (
        f"train: 5 of 9 pairs were dropped (55.6%, more than max_dropped_share 0.5). 5 duplicate pair (e.g. "
        f"{path}[train] row 1, {path}[train] row 2, {path}[train] row 4): remove the repeated pairs. Or set "
        "max_dropped_share (now 0.5) to train on what is left.")
