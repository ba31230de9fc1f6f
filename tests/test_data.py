"""prefopt.data: token ids equal TRL 1.16's, hand-written ids, schemas, loading, report.

Word-level tokenizer ids used in the hand-written cases:
    0 <unk>  1 <s>  2 </s>  3 <|im_start|>  4 <|im_end|>  5 user  6 assistant  7 hi  8 how
    9 are  10 you  11 fine  12 bad  13 thanks  14 go  15 away
"""

import ast
import json
import os
import shutil
from pathlib import Path

import datasets
import pytest
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402

from prefopt.config import DataArgs, DatasetSource, build_config  # noqa: E402
from prefopt import fingerprint as fingerprint_mod  # noqa: E402
from prefopt.data import load_raw, prepare, tokenize_pairs  # noqa: E402
from prefopt.errors import PrefoptError  # noqa: E402
from prefopt.fingerprint import DATA_MODULES, SOURCE, source_hash  # noqa: E402
from prefopt.report import format_report, write_report  # noqa: E402
from prefopt.rows import normalise  # noqa: E402
from prefopt.templates import setup_chat_template  # noqa: E402
from prefopt.tiny import default_corpus, train_tokenizer  # noqa: E402

datasets.disable_progress_bars()

WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "how", "are", "you",
         "fine", "bad", "thanks", "go", "away"]


def words(bos: bool = True) -> PreTrainedTokenizerFast:
    """One id per whitespace-separated word, so expected ids can be written by hand."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>" if bos else None,
                                   eos_token="</s>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def in_memory(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{**r, "source": "mem[train]", "row": i} for i, r in enumerate(rows)])


def tokenize(rows: list[dict], tokenizer, **lengths) -> tuple[list[dict], dict]:
    ds, report = tokenize_pairs(normalise(in_memory(rows)), tokenizer, DataArgs(**lengths))
    return [{k: r[k] for k in ("row", "prompt_ids", "chosen_ids", "rejected_ids")} for r in ds], report


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# (i) Parity with TRL 1.16's CPOTrainer.tokenize_row


@pytest.fixture(scope="module")
def bpe_tokenizers():
    corpus = default_corpus()
    return {
        "bos": train_tokenizer(corpus),
        "no_bos": train_tokenizer(corpus, bos=False),
        "bos_in_template": train_tokenizer(corpus, add_bos_in_template=True),
    }


def trl_tokenize(row: dict, tokenizer, max_length: int) -> dict:
    PartialState()  # TRL warns through accelerate's logger when a completion is cut to nothing
    trainer = CPOTrainer.__new__(CPOTrainer)  # tokenize_row needs only these three attributes
    trainer.processing_class, trainer.max_length, trainer.is_encoder_decoder = tokenizer, max_length, False
    return trainer.tokenize_row(maybe_apply_chat_template(maybe_extract_prompt(dict(row)), tokenizer))


def first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != -100), len(labels))


def trl_completion(ref: dict, side: str) -> list[int]:
    return ref[f"{side}_input_ids"][first_label(ref[f"{side}_labels"]):]


def assert_matches_trl(rows: list[dict], tokenizer, max_length: int = 1024) -> dict:
    """prompt+chosen / prompt+rejected equal TRL's input ids and the prompt ends where TRL's labels
    begin; the pairs TRL would train with an empty completion, or with chosen equal to rejected
    after the cut, are the ones prefopt drops."""
    ours, report = tokenize(rows, tokenizer, max_length=max_length)
    ours = {r["row"]: r for r in ours}
    refs = [trl_tokenize(row, tokenizer, max_length) for row in rows]
    empty_in_trl = {i for i, ref in enumerate(refs)
                    if any(not trl_completion(ref, side) for side in ("chosen", "rejected"))}
    same_in_trl = {i for i, ref in enumerate(refs)
                   if i not in empty_in_trl and trl_completion(ref, "chosen") == trl_completion(ref, "rejected")}
    assert set(ours) == set(range(len(rows))) - empty_in_trl - same_in_trl
    assert report["dropped"]["truncated_to_nothing"] == len(empty_in_trl)
    assert report["dropped"]["chosen_equals_rejected"] == len(same_in_trl)
    for i, mine in ours.items():
        for side in ("chosen", "rejected"):
            assert mine["prompt_ids"] + mine[f"{side}_ids"] == refs[i][f"{side}_input_ids"], (i, side)
            assert len(mine["prompt_ids"]) == first_label(refs[i][f"{side}_labels"]), (i, side)
    return {"refs": refs, "empty_in_trl": empty_in_trl}


TEXT_ROWS = [
    {"prompt": "The cat sees", "chosen": " a red ball.", "rejected": " two apples today."},
    # "ca" + "t" merge into " cat" across the boundary: the prompt part shrinks by one token
    {"prompt": "The ca", "chosen": "t sees the quiet river.", "rejected": "t likes the bright moon again."},
    {"prompt": "Question: who reads an old book?\nAnswer:", "chosen": " The teacher reads it.", "rejected": " A dog."},
    # chosen already ends with EOS: not appended twice
    {"prompt": "My friend opens", "chosen": " the green door<|endoftext|>", "rejected": " a wooden box."},
]
IMPLICIT_TEXT_ROWS = [
    {"chosen": "The farmer helps the old man.", "rejected": "The farmer paints a blue kite."},
    {"chosen": "Every child reads.", "rejected": "Every child reads a long letter."},
]
CHAT_ROWS = [
    {"prompt": [user("What does the cat see?")], "chosen": [assistant("A red ball.")],
     "rejected": [assistant("Two apples.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Who reads?"), assistant("The teacher."),
                user("And who paints?")],
     "chosen": [assistant("Her sister paints.")], "rejected": [assistant("The robot follows the moon.")]},
    # the prompt ends with the assistant's message: it is continued, not closed
    {"prompt": [user("Finish: the dog"), assistant("The dog")], "chosen": [assistant(" finds a box.")],
     "rejected": [assistant(" opens the door.")]},
    # an answer of two assistant messages: both scored, as in TRL
    {"prompt": [user("Who reads?")], "chosen": [assistant("The teacher."), assistant("Every day.")],
     "rejected": [assistant("No one.")]},
]
IMPLICIT_CHAT_ROWS = [
    {"chosen": [user("Hi"), assistant("Hello."), user("Who helps?"), assistant("Our team helps.")],
     "rejected": [user("Hi"), assistant("Hello."), user("Who helps?"), assistant("No one.")]},
    # the shared history is the prompt (TRL's extract_prompt), whatever follows it from the assistant
    {"chosen": [user("Who paints?"), assistant("Her sister."), assistant("She paints well.")],
     "rejected": [user("Who paints?"), assistant("The robot.")]},
]
# TRL's special case: a string prompt beside conversations is ignored, the prompt is extracted
STRING_PROMPT_CHAT_ROWS = [
    {"prompt": "Who helps?", "chosen": [user("Who helps?"), assistant("Our team.")],
     "rejected": [user("Who helps?"), assistant("The farmer, every morning.")]},
]
ROW_SETS = {"text": TEXT_ROWS, "implicit_text": IMPLICIT_TEXT_ROWS, "chat": CHAT_ROWS,
            "implicit_chat": IMPLICIT_CHAT_ROWS, "string_prompt_chat": STRING_PROMPT_CHAT_ROWS}


@pytest.mark.parametrize("tokenizer_name", ["bos", "no_bos", "bos_in_template"])
@pytest.mark.parametrize("rows_name", list(ROW_SETS))
def test_token_ids_match_trl(bpe_tokenizers, rows_name, tokenizer_name):
    tokenizer = bpe_tokenizers[tokenizer_name]
    result = assert_matches_trl(ROW_SETS[rows_name], tokenizer)
    first = result["refs"][0]["chosen_input_ids"]
    if tokenizer_name == "no_bos":
        assert tokenizer.bos_token_id not in first
    else:  # exactly one BOS, including when the template renders it
        assert first[0] == tokenizer.bos_token_id and first.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("rows_name, max_length", [("text", 8), ("chat", 26)])
def test_truncation_matches_trl(bpe_tokenizers, rows_name, max_length):
    result = assert_matches_trl(ROW_SETS[rows_name], bpe_tokenizers["bos"], max_length=max_length)
    lengths = [len(ref[f"{side}_input_ids"]) for ref in result["refs"] for side in ("chosen", "rejected")]
    assert max_length in lengths  # some pair was cut ...
    assert result["empty_in_trl"] and len(result["empty_in_trl"]) < len(ROW_SETS[rows_name])  # ... some dropped


# ---------------------------------------------------------------------------------------------
# (ii) Hand-written ids


PAIR = {"prompt": "how are you", "chosen": " fine thanks", "rejected": " go away"}
NO_DROPS = {"empty_completion": 0, "truncated_to_nothing": 0, "chosen_equals_rejected": 0, "duplicate_pair": 0}


def test_plain_pair_gets_bos_and_eos():
    rows, _ = tokenize([PAIR], words())
    assert rows == [{"row": 0, "prompt_ids": [1, 8, 9, 10], "chosen_ids": [11, 13, 2], "rejected_ids": [14, 15, 2]}]


def test_no_bos_for_a_tokenizer_without_one():
    rows, _ = tokenize([PAIR], words(bos=False))
    assert rows[0]["prompt_ids"] == [8, 9, 10]


def test_eos_not_doubled_when_the_completion_ends_with_it():
    rows, _ = tokenize([{**PAIR, "chosen": " fine thanks </s>"}], words())
    assert rows[0]["chosen_ids"] == [11, 13, 2]  # not [11, 13, 2, 2]
    assert rows[0]["rejected_ids"] == [14, 15, 2]


@pytest.mark.parametrize("bos_in_template", [False, True])
def test_chat_pair_bos_once(bos_in_template):
    tokenizer = words()
    setup_chat_template(tokenizer, "chatml")  # <|im_end|> (4) becomes eos
    if bos_in_template:
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    rows, _ = tokenize([{"prompt": [user("hi")], "chosen": [assistant("fine")], "rejected": [assistant("bad")]}],
                       tokenizer)
    # <s> <|im_start|> user hi <|im_end|> <|im_start|> assistant | fine <|im_end|>: eos already last
    assert rows[0]["prompt_ids"] == [1, 3, 5, 7, 4, 3, 6]
    assert rows[0]["chosen_ids"] == [11, 4]
    assert rows[0]["rejected_ids"] == [12, 4]


@pytest.mark.parametrize("mode, bos, expected", [
    ("keep_end", True, [1, 9, 10]),  # BOS kept, then the prompt's last tokens
    ("keep_start", True, [1, 8, 9]),
    ("keep_end", False, [9, 10]),
])
def test_prompt_truncation(mode, bos, expected):
    limit = 3 if bos else 2
    rows, report = tokenize([PAIR], words(bos), max_prompt_length=limit, truncation_mode=mode)
    assert rows[0]["prompt_ids"] == expected
    assert rows[0]["chosen_ids"] == [11, 13, 2]
    assert report["truncated"] == {"prompt": 1, "chosen": 0, "rejected": 0}


def test_completion_caps():
    rows, _ = tokenize([PAIR], words(), max_completion_length=1)
    assert (rows[0]["chosen_ids"], rows[0]["rejected_ids"]) == ([11], [14])
    # max_length 6 with a 4-token prompt: each completion keeps 2 tokens, losing EOS (TRL's rule)
    rows, report = tokenize([PAIR], words(), max_length=6)
    assert (rows[0]["prompt_ids"], rows[0]["chosen_ids"], rows[0]["rejected_ids"]) == ([1, 8, 9, 10], [11, 13], [14, 15])
    assert report["truncated"] == {"prompt": 0, "chosen": 1, "rejected": 1}


def test_completion_truncated_to_nothing_is_dropped():
    rows = [{"prompt": "how are you", "chosen": " fine", "rejected": " bad"},  # prompt alone fills max_length
            {"prompt": "hi", "chosen": " fine thanks", "rejected": " go away"}]
    kept, report = tokenize(rows, words(), max_length=4)
    assert kept == [{"row": 1, "prompt_ids": [1, 7], "chosen_ids": [11, 13], "rejected_ids": [14, 15]}]
    assert report["dropped"] == {**NO_DROPS, "truncated_to_nothing": 1}
    assert report["dropped_rows"] == {"truncated_to_nothing": ["mem[train] row 0"]}


def test_blank_completions_are_dropped():
    rows = [{**PAIR, "chosen": "  \n"}, {**PAIR, "rejected": ""}, PAIR]
    kept, report = tokenize(rows, words())
    assert [r["row"] for r in kept] == [2]
    assert report["dropped"] == {**NO_DROPS, "empty_completion": 2}
    assert report["dropped_rows"] == {"empty_completion": ["mem[train] row 0", "mem[train] row 1"]}

    tokenizer = words()
    setup_chat_template(tokenizer, "chatml")
    chat = [{"prompt": [user("hi")], "chosen": [assistant(" ")], "rejected": [assistant("bad")]}]
    kept, report = tokenize(chat, tokenizer)
    assert kept == [] and report["dropped"]["empty_completion"] == 1


# ---------------------------------------------------------------------------------------------
# (iii) Schemas


@pytest.mark.parametrize("chosen, rejected", [
    ("how are you fine", "how are you go away"),
    ("abc", "abcd"),  # one answer is a prefix of the other
    ("same", "same"),
    ("Q: hi\nA: yes", "Q: hi\nA: no"),
])
def test_implicit_text_prompt_as_trl(chosen, rejected):
    ours = normalise(in_memory([{"chosen": chosen, "rejected": rejected}]))[0]
    trl = maybe_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert {k: ours[k] for k in ("prompt", "chosen", "rejected")} == trl


def test_implicit_text_prompt_keeps_the_space_with_the_answers():
    row = normalise(in_memory([{"chosen": "how are you fine", "rejected": "how are you go away"}]))[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("how are you", " fine", " go away")


def test_implicit_chat_prompt_is_the_shared_history():
    row, several = normalise(in_memory(IMPLICIT_CHAT_ROWS))
    assert row["prompt"] == [user("Hi"), assistant("Hello."), user("Who helps?")]
    assert row["chosen"] == [assistant("Our team helps.")]
    assert row["rejected"] == [assistant("No one.")]
    assert several["prompt"] == [user("Who paints?")]
    assert several["chosen"] == [assistant("Her sister."), assistant("She paints well.")]
    assert several["rejected"] == [assistant("The robot.")]


def test_string_prompt_beside_conversations_is_replaced():
    row = normalise(in_memory(STRING_PROMPT_CHAT_ROWS))[0]
    assert row["prompt"] == [user("Who helps?")]
    assert row["chosen"] == [assistant("Our team.")]


def test_explicit_rows_pass_through():
    row = normalise(in_memory([PAIR]))[0]
    assert row == {**PAIR, "source": "mem[train]", "row": 0}


def test_chat_rows_need_a_chat_template():
    with pytest.raises(PrefoptError, match="no chat template.*chat_template: chatml"):
        tokenize(CHAT_ROWS, words())


def test_prompt_must_end_with_a_user_or_assistant_message():
    tokenizer = words()
    setup_chat_template(tokenizer, "chatml")
    rows = [{"prompt": [{"role": "system", "content": "hi"}], "chosen": [assistant("fine")],
             "rejected": [assistant("bad")]}]
    with pytest.raises(PrefoptError, match=r"mem\[train\] row 0: the prompt must end with a user"):
        tokenize(rows, tokenizer)


# ---------------------------------------------------------------------------------------------
# Chat template setup


def test_chatml_adds_tokens_and_renders():
    tokenizer = train_tokenizer(default_corpus(), chat_template=None, pad=None)
    size = len(tokenizer)
    assert setup_chat_template(tokenizer, "chatml") is True
    assert len(tokenizer) == size + 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template([user("Hi"), assistant("Yo")], tokenize=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    prompt = tokenizer.apply_chat_template([user("Hi")], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    assert setup_chat_template(tokenizer, "chatml") is False  # already there


def test_chat_template_from_file_string_and_bad_value(tmp_path):
    tokenizer = words()
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert setup_chat_template(tokenizer, str(path)) is False
    assert tokenizer.apply_chat_template([user("hi")], tokenize=False) == "[hi]"
    assert tokenizer.pad_token == "</s>"  # no pad token: eos
    setup_chat_template(tokenizer, "{{ messages[0]['content'] }}!")
    assert tokenizer.apply_chat_template([user("hi")], tokenize=False) == "hi!"
    with pytest.raises(PrefoptError, match="not chatml, a .jinja file or a Jinja template"):
        setup_chat_template(tokenizer, "llama3")


# ---------------------------------------------------------------------------------------------
# (iv) Loading


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


# ---------------------------------------------------------------------------------------------
# (v) Report


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
