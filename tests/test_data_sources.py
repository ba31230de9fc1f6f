"""prefopt.data's loading: files of each type, folders of split files, saved dataset dicts, keep
fractions, mixtures, held-out splits, column mappings and kept columns; and its refusals, each naming
the file, split, row or column and the fix."""

import json

import datasets
import pytest
from datasets import Dataset, DatasetDict

from data_helpers import CHAT_ROWS, PAIR, assistant, write_jsonl
from prefopt.config import DataArgs, DatasetSource
from prefopt.data import load_raw
from prefopt.errors import PrefoptError

datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Loading


ROWS = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(10)]


def plain(ds: Dataset) -> list[dict]:
    return [dict(r) for r in ds]


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "csv"])
def test_load_a_file(tmp_path, ext):
    path = tmp_path / f"prefs.{ext}"
    rows = ROWS[:4]
    if ext == "jsonl":
        write_jsonl(path, rows)
    elif ext == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(Dataset.from_list(rows), f"to_{ext}")(str(path), **({"index": False} if ext == "csv" else {}))
    train, evals = load_raw(DataArgs(train_datasets=[DatasetSource(path=str(path))]), seed=0)
    assert evals is None
    assert plain(train) == [{**r, "source": f"{path}[train]", "row": i} for i, r in enumerate(rows)]


def test_load_a_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:6])
    write_jsonl(tmp_path / "test.jsonl", ROWS[6:])
    Dataset.from_list(ROWS[:2]).to_parquet(str(tmp_path / "test_prefs.parquet"))
    data = DataArgs(train_datasets=[DatasetSource(path=str(tmp_path), split="train")],
                    eval_datasets=[DatasetSource(path=str(tmp_path), split="test"),
                                   DatasetSource(path=str(tmp_path), split="test_prefs")])
    train, evals = load_raw(data, seed=0)
    assert train["prompt"] == [f"q{i}" for i in range(6)]
    assert evals["prompt"] == ["q6", "q7", "q8", "q9", "q0", "q1"]
    assert evals["source"] == [f"{tmp_path}[test]"] * 4 + [f"{tmp_path}[test_prefs]"] * 2
    assert evals["row"] == [0, 1, 2, 3, 0, 1]


def test_load_a_saved_dataset_dict(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS[:3]), "test": Dataset.from_list(ROWS[3:5])}).save_to_disk(
        str(tmp_path / "saved"))
    data = DataArgs(train_datasets=[DatasetSource(path=str(tmp_path / "saved"))],
                    eval_datasets=[DatasetSource(path=str(tmp_path / "saved"), split="test")])
    train, evals = load_raw(data, seed=0)
    assert (train["prompt"], evals["prompt"]) == (["q0", "q1", "q2"], ["q3", "q4"])


def test_keep_fraction_takes_the_first_rows_of_train_only(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    data = DataArgs(train_datasets=[DatasetSource(path=path, keep_fraction=0.35)],
                    eval_datasets=[DatasetSource(path=path, keep_fraction=0.35)])
    train, evals = load_raw(data, seed=0)
    assert train["row"] == [0, 1, 2]  # int(0.35 * 10)
    assert len(evals) == 10


@pytest.mark.parametrize("shares, expected", [
    ((1, 1), (4, 4)),  # N = min(10 / 0.5, 4 / 0.5) = 8
    ((3, 1), (10, 3)),  # N = min(10 / 0.75, 4 / 0.25) = 13.3: round(10), round(3.3)
])
def test_mix_shares(tmp_path, shares, expected):
    big, small = write_jsonl(tmp_path / "big.jsonl", ROWS), write_jsonl(tmp_path / "small.jsonl", ROWS[:4])
    data = DataArgs(train_datasets=[DatasetSource(path=big, mix_share=shares[0]),
                                    DatasetSource(path=small, mix_share=shares[1])])
    train, _ = load_raw(data, seed=0)
    assert train["source"].count(f"{big}[train]") == expected[0]
    assert train["source"].count(f"{small}[train]") == expected[1]
    assert train["row"] == list(range(expected[0])) + list(range(expected[1]))


def test_test_split_size_holds_out_train_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    extra = write_jsonl(tmp_path / "extra.jsonl", ROWS[:2])
    train, evals = load_raw(DataArgs(train_datasets=[DatasetSource(path=path)], test_split_size=0.3), seed=3)
    assert (len(train), len(evals)) == (7, 3)
    assert sorted(list(train["row"]) + list(evals["row"])) == list(range(10))
    again, _ = load_raw(DataArgs(train_datasets=[DatasetSource(path=path)], test_split_size=0.3), seed=3)
    assert again["row"] == train["row"]
    # a row count, appended after an explicit eval set
    data = DataArgs(train_datasets=[DatasetSource(path=path)], eval_datasets=[DatasetSource(path=extra)],
                    test_split_size=4.0)
    train, evals = load_raw(data, seed=0)
    assert (len(train), len(evals)) == (6, 6)
    assert evals["source"][:2] == [f"{extra}[train]"] * 2


def test_column_mapping(tmp_path):
    rows = [{"question": "q", "good": " a", "bad": " b", "chosen": "ignored"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    train, _ = load_raw(DataArgs(train_datasets=[DatasetSource(path=path)], column_mapping=mapping), seed=0)
    assert plain(train) == [{"prompt": "q", "chosen": " a", "rejected": " b", "source": f"{path}[train]", "row": 0}]
    swapped, _ = load_raw(DataArgs(train_datasets=[DatasetSource(path=write_jsonl(tmp_path / "e.jsonl", [PAIR]))],
                                   column_mapping={"chosen": "rejected", "rejected": "chosen"}), seed=0)
    assert (swapped[0]["chosen"], swapped[0]["rejected"]) == (" go away", " fine thanks")


def test_columns_keeps_only_those(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "unused", "chosen": "how are you fine",
                                               "rejected": "how are you go away", "prompt_id": "x"}])
    train, _ = load_raw(DataArgs(train_datasets=[DatasetSource(path=path, columns=["chosen", "rejected"])]), seed=0)
    assert train[0]["prompt"] == "how are you"  # extracted: the prompt column was not kept
    with pytest.raises(PrefoptError, match=r"columns \['score'\] are listed in `columns`"):
        load_raw(DataArgs(train_datasets=[DatasetSource(path=path, columns=["score"])]), seed=0)


def test_error_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer_a": "a", "answer_b": "b"}])
    with pytest.raises(PrefoptError) as e:
        load_raw(DataArgs(train_datasets=[DatasetSource(path=path)]), seed=0)
    message = str(e.value)
    assert f"{path}[train]: no chosen or rejected column" in message
    assert "columns found: ['prompt', 'answer_a', 'answer_b']" in message
    assert "chat message lists" in message and "column_mapping" in message


def test_error_missing_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    data = DataArgs(train_datasets=[DatasetSource(path=str(tmp_path))],
                    eval_datasets=[DatasetSource(path=str(tmp_path), split="test")])
    with pytest.raises(PrefoptError) as e:
        load_raw(data, seed=0)
    assert f"{tmp_path}: no split 'test' (splits found: train)" in str(e.value)
    assert "`dataset_splits: [train]` with `test_split_size: 0.1`" in str(e.value)
    path = write_jsonl(tmp_path / "one.jsonl", ROWS)
    with pytest.raises(PrefoptError, match=r"no split 'test' \(splits found: train\)"):
        load_raw(DataArgs(train_datasets=[DatasetSource(path=path, split="test")]), seed=0)


def test_error_mixed_types(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "chosen": "fine", "rejected": [assistant("bad")]}])
    with pytest.raises(PrefoptError) as e:
        load_raw(DataArgs(train_datasets=[DatasetSource(path=path)]), seed=0)
    assert f"{path}[train] row 0: columns chosen and rejected differ in type" in str(e.value)
    assert "both plain strings or both chat message lists" in str(e.value)


def test_error_text_and_chat_sources_in_one_split(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [PAIR])
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:1])
    with pytest.raises(PrefoptError, match="must use the same schema"):
        load_raw(DataArgs(train_datasets=[DatasetSource(path=text), DatasetSource(path=chat)]), seed=0)


def test_error_unknown_extension(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("hello")
    with pytest.raises(PrefoptError) as e:
        load_raw(DataArgs(train_datasets=[DatasetSource(path=str(path))]), seed=0)
    assert "unsupported file type '.txt'" in str(e.value)
    assert ".json, .jsonl, .parquet, .csv" in str(e.value)


def test_error_missing_local_file(tmp_path):
    with pytest.raises(PrefoptError, match="no such file or folder"):
        load_raw(DataArgs(train_datasets=[DatasetSource(path=str(tmp_path / "nope.jsonl"))]), seed=0)


def test_error_null_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, {**PAIR, "rejected": None}])
    with pytest.raises(PrefoptError, match=r"d.jsonl\[train\] row 1: column 'rejected' has no value \(missing or null\)"):
        load_raw(DataArgs(train_datasets=[DatasetSource(path=path)]), seed=0)
