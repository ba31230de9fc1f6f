"""auto_insert_empty_system_msg: an empty system turn before a chat prompt that has none, where the
template takes a system role; a note, said once, where it does not; both keys in the cache key."""

import datasets
import pytest

from data_helpers import CHAT_ROWS, in_memory, write_jsonl
from prefopt.config import DataArgs, build_config
from prefopt.data import prepare, tokenize_pairs
from prefopt.report import format_report
from prefopt.rows import normalise
from template_families import family_tokenizer

datasets.disable_progress_bars()

NOTE = ("auto_insert_empty_system_msg: the chat template names no system role or refuses one, so no empty system "
        "turn was inserted")


def prompts(rows, tokenizer, **data) -> tuple[list[str], dict]:
    kept, report = tokenize_pairs(normalise(in_memory(rows)), tokenizer, DataArgs(**data))
    return [tokenizer.decode(r["prompt_ids"]) for r in kept], report


@pytest.mark.parametrize("given, inserted", [(True, True), (False, False), (None, False)])  # None: false for trl
def test_an_empty_system_turn_opens_a_prompt_without_one(given, inserted):
    tokenizer = family_tokenizer("zephyr")
    texts, report = prompts(CHAT_ROWS, tokenizer, auto_insert_empty_system_msg=given)
    system = "<|system|>\n</s>\n"
    assert texts[0] == "<s>" + system * inserted + "<|user|>\nWhat does the cat see?</s>\n<|assistant|>\n"
    assert texts[1].startswith("<s><|system|>\nBe brief.</s>\n<|user|>")  # a row's own system turn stays alone
    assert all(t.startswith("<s>" + system) == inserted for t in texts[2:])
    assert "notes" not in report


def test_the_simpo_repo_layout_inserts_one_by_default():
    texts, _ = prompts(CHAT_ROWS[:1], family_tokenizer("zephyr"), completion_layout="simpo_repo")
    assert texts[0] == "<s><|system|>\n</s>\n<|user|>\nWhat does the cat see?</s>\n"
    texts, _ = prompts(CHAT_ROWS[:1], family_tokenizer("zephyr"), completion_layout="simpo_repo",
                       auto_insert_empty_system_msg=False)
    assert texts[0] == "<s><|user|>\nWhat does the cat see?</s>\n"


def test_text_rows_are_unaffected():
    rows = [{"prompt": "The cat sees", "chosen": " a red ball.", "rejected": " two apples."}]
    assert prompts(rows, family_tokenizer("zephyr"), auto_insert_empty_system_msg=True) == \
        prompts(rows, family_tokenizer("zephyr"))


@pytest.mark.parametrize("family", ["gemma", "llama3"])  # Gemma's refuses a system turn; Llama 3's names none
def test_a_template_that_does_not_take_one_gets_none_and_the_run_says_so_once(family, tmp_path):
    tokenizer = family_tokenizer(family)
    # rows without a system turn
    rows = [dict(CHAT_ROWS[0], chosen=[{"role": "assistant", "content": f"Answer {i}."}]) for i in range(6)]
    texts, report = prompts(rows, tokenizer, auto_insert_empty_system_msg=True)
    assert texts == prompts(rows, tokenizer)[0] and len(texts) == 6  # nothing inserted
    assert report["notes"] == [NOTE]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(tmp_path / "out"),
                        "per_device_train_batch_size": 1, "test_split_size": 2, "auto_insert_empty_system_msg": True})
    prepared = prepare(cfg, tokenizer)
    assert prepared.report["train"]["notes"] == prepared.report["eval"]["notes"] == [NOTE]
    assert format_report(prepared.report).count("note:") == 1
    assert format_report(prepared.report).endswith(f"\nnote: {NOTE}")


def test_both_keys_enter_the_cache_key():
    ds = normalise(in_memory(CHAT_ROWS))
    keys = {(layout, insert): tokenize_pairs(ds, family_tokenizer("zephyr"), DataArgs(
        completion_layout=layout, auto_insert_empty_system_msg=insert))[0]._fingerprint
        for layout in ("trl", "simpo_repo") for insert in (None, True, False)}
    assert len(set(keys.values())) == len(keys)
    # Gemma's template takes no system turn: the same columns either way, and still a key of their own
    ds = normalise(in_memory(CHAT_ROWS[:1]))
    gemma = [tokenize_pairs(ds, family_tokenizer("gemma"), DataArgs(auto_insert_empty_system_msg=v))[0]
             for v in (True, False)]
    assert gemma[0]["prompt_ids"] == gemma[1]["prompt_ids"] and gemma[0]._fingerprint != gemma[1]._fingerprint
