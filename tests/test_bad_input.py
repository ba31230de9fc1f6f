"""Bad input is refused before any weights load, with a message naming the file, split, row and
column or key, and the fix; or, where the issue allows it, dropped and counted in the report.

One test per item of the issue ("Trust"); some items are also asserted elsewhere, as noted:

 1 missing or misnamed columns           test_1_missing_or_misnamed_columns
                                         (and test_data.py::test_error_missing_column)
 2 mixed types in a column or a row      test_2_mixed_types_name_the_row_and_column
                                         (and test_data.py::test_error_mixed_types)
 3 multi-turn histories / last turn      test_3_answers_hold_only_assistant_turns_and_end_with_one
 4 blank or cut-to-nothing completions   test_4_dropped_pairs_are_counted_and_too_many_stop_the_run
                                         (and test_data.py::test_blank_completions_are_dropped,
                                         test_completion_truncated_to_nothing_is_dropped)
 5 prompts longer than the limits        test_5_prompt_truncation_policy_is_reported
 6 chat data, no chat template           test_6_chat_rows_without_a_chat_template_suggest_chatml
 7 no pad token, pad == eos              test_7_pad_equal_to_eos_still_trains_on_eos
 8 BOS or EOS doubled                    test_8_bos_and_eos_appear_once
                                         (and test_data.py::test_chat_pair_bos_once,
                                         test_eos_not_doubled_when_the_completion_ends_with_it,
                                         test_token_ids_match_trl[*-bos_in_template])
 9 duplicate pairs, chosen == rejected   test_9_duplicates_and_identical_answers_are_dropped_and_counted
10 empty data, fewer rows than a step    test_10_empty_data_and_too_few_pairs_for_one_step
11 config and file errors                test_11_bad_configs, test_11_missing_model_folder,
                                         test_11_unreadable_data_files
                                         (and test_config.py::test_bad_configs_are_refused_with_the_fix)

Then issue 11 ("Trust, round 2"), item 5, data that would train the wrong thing silently:

 a system, user or tool turn inside      test_i11_5_turns_inside_the_answer_are_refused
   the scored answer; the shared         (and test_3, test_data.py::test_token_ids_match_trl[*-implicit_chat],
   history of chosen/rejected kept       test_implicit_chat_prompt_is_the_shared_history)
 a role the chat template does not know  test_i11_5_roles_the_template_does_not_know
 test_split_size below one pair          test_i11_5_test_split_size_below_one_pair
 ShareGPT {from, value} messages         test_i11_5_sharegpt_messages_name_what_was_found
 each of these before the weights load   test_i11_5_refused_before_the_weights_load,
                                         test_i11_5_the_same_rows_unchanged_reach_the_weights

Then a property test: random rows and small configs either prepare and collate, or stop with a
PrefoptError, never another exception.
"""

import itertools
import json

import datasets
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import make_trainer
from prefopt.cli import main
from prefopt.collate import LAYOUTS, collator_for
from prefopt.config import DataArgs, DatasetSource, build_config, load_config
from prefopt.data import (
    SCHEMAS,
    format_report,
    load_raw,
    normalise,
    prepare,
    setup_chat_template,
    tokenize_pairs,
    write_report,
)
from prefopt.demo import make_rows, task_corpus
from prefopt.errors import PrefoptError
from prefopt.step import loss, score
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def toks():
    corpus = task_corpus()
    return {
        "chat": train_tokenizer(corpus, vocab_size=300),  # ChatML template, eos <|endoftext|>, pad <pad>
        "plain": train_tokenizer(corpus, vocab_size=300, chat_template=None),
        "pad_eos": train_tokenizer(corpus, vocab_size=300, pad="eos"),
    }


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, path: str, **keys):
    return build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(tmp_path / "out"),
                         "per_device_train_batch_size": 1, **keys})


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(PrefoptError) as e:
        call(*args, **kwargs)
    return str(e.value)


def load(path: str, **data):
    return load_raw(DataArgs(train_datasets=[DatasetSource(path=path)], **data), seed=0)


def tokenized(rows: list[dict], tokenizer, **data) -> tuple[list[dict], dict]:
    ds = Dataset.from_list([{**r, "source": "mem[train]", "row": i} for i, r in enumerate(rows)])
    out, report = tokenize_pairs(normalise(ds), tokenizer, DataArgs(**data))
    return [dict(r) for r in out], report


PAIR = {"prompt": "Sort: 3 1 2 =", "chosen": " 1 2 3", "rejected": " 1 3 2"}


def pairs(n: int) -> list[dict]:
    """n distinct text pairs."""
    return [{**PAIR, "prompt": f"Sort: {i} 3 1 ="} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The items


def test_1_missing_or_misnamed_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected_response": "b"}])
    message = refusal(load, path)
    assert f"{path}[train]: no rejected column (columns found: ['prompt', 'chosen', 'rejected_response'])" in message
    assert SCHEMAS in message and "column_mapping: {prompt: question" in message
    message = refusal(load, path, column_mapping={"rejected": "bad"})
    assert (f"{path}[train]: column_mapping takes rejected from column 'bad', which this dataset does not have "
            "(columns found: ['prompt', 'chosen', 'rejected_response']); fix the mapping.") in message


def test_2_mixed_types_name_the_row_and_column(tmp_path):
    # a column that is a string in some rows and a message list in another
    rows = pairs(3) + [{**PAIR, "rejected": [assistant("1 3 2")]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert refusal(load, path).startswith(
        f"{path}[train] row 3: column 'rejected' holds a chat message list, but {path}[train] row 0 holds a plain "
        "string. A column must hold plain strings in every row, or chat message lists [{role, content}, ...] in "
        "every row; fix that row or remove it.")
    # a number among strings
    path = write_jsonl(tmp_path / "n.jsonl", pairs(2) + [{**PAIR, "prompt": 7}])
    assert f"{path}[train] row 2: column 'prompt' holds the int 7, but {path}[train] row 0 holds" in refusal(load, path)
    # a message whose content is not a string, and one without a role
    chat = {"prompt": [user("Sort: 2 1")], "chosen": [assistant("1 2")], "rejected": [assistant("2 1")]}
    path = write_jsonl(tmp_path / "m.jsonl", [chat, {**chat, "chosen": [assistant("1 2"), assistant(5)]}])
    assert f"{path}[train] row 1: column 'chosen' holds a list whose item 1 has content 5 (int), not a string" \
        in refusal(load, path)
    path = write_jsonl(tmp_path / "r.jsonl", [chat, {**chat, "prompt": [{"role": None, "content": "hi"}]}])
    assert (f"{path}[train] row 1: column 'prompt', message 0 has no role; every message needs a role and a "
            "content, both strings.") in refusal(load, path)
    # within one row, chosen a string and rejected a message list (every row alike)
    path = write_jsonl(tmp_path / "w.jsonl", [{**PAIR, "rejected": [assistant("x")]}])
    assert f"{path}[train] row 0: columns chosen and rejected differ in type" in refusal(load, path)


def test_3_answers_hold_only_assistant_turns_and_end_with_one(tmp_path):
    good = {"chosen": [user("Sort: 2 1"), assistant("1 2")], "rejected": [user("Sort: 2 1"), assistant("2 1")]}
    differ = {"chosen": [user("Sort: 2 1"), assistant("1 2"), user("again"), assistant("1 2")],
              "rejected": [user("Sort: 2 1"), assistant("2 1"), user("again"), assistant("2 1")]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, differ])
    # the shared history is the first message: the user's "again" would be part of the scored answer
    assert refusal(load, path) == (
        f"{path}[train] row 1: column 'chosen', message 2 is from the user, inside the answer: every message of an "
        "answer is scored as the model's reply, so this turn would be trained on as the model's own words. With no "
        "prompt column, the prompt is the messages chosen and rejected share (here the first message) and the answer "
        "is the rest; they first differ at message 1 (chosen: assistant: \"1 2\"; rejected: assistant: \"2 1\"). "
        "Make the conversations identical up to the assistant's final reply, or give the prompt in a 'prompt' column "
        "and only the assistant's messages in chosen and rejected.")
    ends_with_user = {**good, "rejected": [user("Sort: 2 1"), assistant("2 1"), user("wrong")]}
    path = write_jsonl(tmp_path / "u.jsonl", [good, ends_with_user])
    assert refusal(load, path) == (f"{path}[train] row 1: the last message of 'rejected' is from the user, not the "
                                   "assistant; each answer must end with the assistant's reply.")
    # an explicit prompt repeated at the start of the answers
    repeated = {"prompt": [user("Sort: 2 1")], **good}
    path = write_jsonl(tmp_path / "p.jsonl", [repeated])
    assert f"{path}[train] row 0: chosen or rejected repeats the prompt's messages" in refusal(load, path)


def test_4_dropped_pairs_are_counted_and_too_many_stop_the_run(toks, tmp_path):
    rows = pairs(8) + [{**PAIR, "chosen": " \n"}, {**PAIR, "prompt": "Sort: 9 9 =", "rejected": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # 2 of 10 dropped: more than the default max_dropped_share 0.1
    assert refusal(prepare, config(tmp_path, path), toks["chat"]) == (
        f"train: 2 of 10 pairs were dropped (20.0%, more than max_dropped_share 0.1). 2 empty completion (e.g. "
        f"{path}[train] row 8, {path}[train] row 9): fill in or remove the blank answers. Or set max_dropped_share "
        "(now 0.1) to train on what is left.")
    prepared = prepare(config(tmp_path, path, max_dropped_share=0.2), toks["chat"])
    assert prepared.report["train"]["dropped"]["empty_completion"] == 2 and prepared.report["train"]["kept"] == 8
    # completions emptied by truncation: counted under their own reason, with the fix
    message = refusal(prepare, config(tmp_path, path, max_length=7), toks["chat"])
    assert message.startswith("every train pair was dropped. 2 empty completion")
    assert "8 truncated to nothing (e.g." in message and "raise max_length, or set max_prompt_length" in message
    assert refusal(build_config, {"method": "simpo", "max_dropped_share": 1.5}) == \
        "config: max_dropped_share must be a share in [0, 1], got 1.5."


def test_5_prompt_truncation_policy_is_reported(toks, tmp_path):
    long = {**PAIR, "prompt": "Sort: " + " ".join("9" * 30) + " ="}
    path = write_jsonl(tmp_path / "d.jsonl", pairs(3) + [long])
    report = prepare(config(tmp_path, path, max_prompt_length=12, truncation_mode="keep_start"), toks["chat"]).report
    assert report["train"]["truncated"]["prompt"] == 1
    assert report["train"]["truncation"] == {"max_length": 1024, "max_prompt_length": 12,
                                             "max_completion_length": None, "truncation_mode": "keep_start"}
    assert ("  truncated: prompt 1 (to max_prompt_length 12, keep_start), chosen 0, rejected 0 (to max_length 1024, "
            "max_completion_length None)") in format_report(report)
    # no max_prompt_length: a prompt that fills max_length leaves no room, and its pair is dropped and named
    report = prepare(config(tmp_path, path, max_length=24, max_dropped_share=0.25), toks["chat"]).report
    assert report["train"]["dropped"]["truncated_to_nothing"] == 1
    assert report["train"]["dropped_rows"] == {"truncated_to_nothing": [f"{path}[train] row 3"]}
    assert "prompt 0 (never cut: no max_prompt_length)" in format_report(report)


def test_6_chat_rows_without_a_chat_template_suggest_chatml(toks, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_rows(2, 0, chat=True))
    assert refusal(prepare, config(tmp_path, path), toks["plain"]) == (
        f"{path}[train] row 0: the pairs are chat messages but the tokenizer has no chat template; set "
        "`chat_template: chatml` (or a .jinja file).")


def test_7_pad_equal_to_eos_still_trains_on_eos(toks, tmp_path):
    tokenizer = toks["pad_eos"]
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    no_pad = train_tokenizer(task_corpus(), vocab_size=300, pad=None)
    setup_chat_template(no_pad, None)  # what the pipeline does with a tokenizer that has no pad token
    assert no_pad.pad_token_id == no_pad.eos_token_id

    cfg = config(tmp_path, write_jsonl(tmp_path / "d.jsonl", make_rows(5, 0)))
    features = [dict(r) for r in prepare(cfg, tokenizer).train]
    assert all(f["chosen_ids"][-1] == eos and f["rejected_ids"][-1] == eos for f in features)
    model = tiny_model("llama", tokenizer, seed=0).eval()
    trainer = make_trainer(model, {"method": "simpo"}, tmp_path / "run")
    with torch.no_grad():
        reference = {}  # mean log p over each completion, EOS included, from one unpadded forward each
        for i, f in enumerate(features):
            for side in ("chosen", "rejected"):
                ids = f["prompt_ids"] + f[f"{side}_ids"]
                logps = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                P = len(f["prompt_ids"])
                reference[side, i] = torch.stack([logps[t - 1, ids[t]] for t in range(P, len(ids))]).mean()
        for layout in LAYOUTS:
            batch = collator_for(cfg, tokenizer.pad_token_id, layout, model.config._attn_implementation)(features)
            # padding uses the EOS id too, yet exactly the 2 per pair real EOS are scored
            assert int(((batch["score_target"] == eos) & batch["score_is_completion"]).sum()) == 2 * len(features)
            pairs = loss(score(model, batch, trainer.scorer(model)), trainer.step_objective).pairs
            for side, logps in (("chosen", pairs.chosen_logps), ("rejected", pairs.rejected_logps)):
                expected = torch.stack([reference[side, i] for i in range(len(features))])
                torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


def test_8_bos_and_eos_appear_once(tmp_path):
    rows = make_rows(3, 0, chat=True)
    # a template that renders BOS itself
    tokenizer = train_tokenizer(task_corpus(), vocab_size=300, add_bos_in_template=True)
    for f in tokenized(rows, tokenizer)[0]:
        assert f["prompt_ids"][0] == tokenizer.bos_token_id and f["prompt_ids"].count(tokenizer.bos_token_id) == 1
    # ChatML with <|im_end|> as EOS: each turn renders as `<|im_end|>\n`; the completion stops at <|im_end|>
    tokenizer = train_tokenizer(task_corpus(), vocab_size=300, chat_template=None)
    setup_chat_template(tokenizer, "chatml")
    for f in tokenized(rows, tokenizer)[0]:
        for side in ("chosen", "rejected"):
            tokens = tokenizer.convert_ids_to_tokens(f[f"{side}_ids"])
            assert tokens[-1] == "<|im_end|>" and tokens.count("<|im_end|>") == 1, tokens
    # text answers that already end with EOS, then whitespace, or twice
    tokenizer = train_tokenizer(task_corpus(), vocab_size=300)
    eos = tokenizer.eos_token
    (f,), _ = tokenized([{**PAIR, "chosen": f" 1 2 3{eos}\n", "rejected": f" 1 3 2{eos} {eos}"}], tokenizer)
    assert tokenizer.convert_ids_to_tokens(f["chosen_ids"]) == ["Ġ1", "Ġ2", "Ġ3", eos]
    assert tokenizer.convert_ids_to_tokens(f["rejected_ids"]) == ["Ġ1", "Ġ3", "Ġ2", eos]


def test_9_duplicates_and_identical_answers_are_dropped_and_counted(toks, tmp_path):
    rows = pairs(6) + [pairs(6)[2], {**PAIR, "prompt": "Sort: 5 5 =", "rejected": PAIR["chosen"]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(config(tmp_path, path, max_dropped_share=0.25), toks["chat"])
    assert prepared.train["row"] == [0, 1, 2, 3, 4, 5]
    report = prepared.report["train"]
    assert report["dropped"] == {"empty_completion": 0, "truncated_to_nothing": 0, "chosen_equals_rejected": 1,
                                 "duplicate_pair": 1}
    assert report["dropped_rows"] == {"chosen_equals_rejected": [f"{path}[train] row 7"],
                                      "duplicate_pair": [f"{path}[train] row 6"]}
    assert "train: 6 of 8 pairs kept (dropped: 1 chosen equals rejected, 1 duplicate pair)" in format_report(
        prepared.report)
    written = json.loads(write_report(prepared.report, tmp_path / "out").read_text())
    assert written["train"]["dropped"] == report["dropped"]
    # answers that differ only past the cut are the same pair to the model
    rows = pairs(4) + [{**PAIR, "chosen": " 1 2 3 4", "rejected": " 1 2 3 5"}]
    report = prepare(config(tmp_path, write_jsonl(tmp_path / "c.jsonl", rows), max_completion_length=3,
                            max_dropped_share=0.2), toks["chat"]).report["train"]
    assert report["dropped"]["chosen_equals_rejected"] == 1


def test_10_empty_data_and_too_few_pairs_for_one_step(toks, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert refusal(load, str(empty)) == f"{empty}: the file holds no rows; give a file with preference pairs in it."
    no_rows = tmp_path / "none.parquet"
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(no_rows))
    assert refusal(load, str(no_rows)) == f"{no_rows}: the file holds no rows; give a file with preference pairs in it."
    path = write_jsonl(tmp_path / "d.jsonl", pairs(5))
    assert refusal(load_raw, DataArgs(train_datasets=[DatasetSource(path=path, keep_fraction=0.1)]), seed=0) == (
        f"{path}[train]: no training rows left; check that the files hold rows and that keep_fraction/fraction "
        "are not too small.")
    cfg = config(tmp_path, path, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    assert refusal(prepare, cfg, toks["chat"]) == (
        "train: 5 pairs, fewer than one optimizer step takes (per_device_train_batch_size 3 × "
        "gradient_accumulation_steps 2 × 1 processes = 6); add data, or lower per_device_train_batch_size or "
        "gradient_accumulation_steps.")


@pytest.mark.parametrize("yaml_text, message", [
    ("method: simpo\nbeta: 2\n  gamma_beta_ratio: 0.5\n", "c.yaml: line 3, column 19 is not valid YAML (mapping "
                                                          "values are not allowed here)."),
    ("method: simpo\nlearning_rat: 1e-6", "c.yaml: unknown key 'learning_rat'. Did you mean 'learning_rate'?"),
    ("method: simpo\nevaluation_strategy: steps\neval_strategy: steps",
     "c.yaml: 'eval_strategy' and 'evaluation_strategy' say the same thing; keep one of them."),
    ("method: simpo\ntorch_dtype: bfloat16\ndtype: float32",
     "c.yaml: 'dtype' and 'torch_dtype' say the same thing; keep one of them."),
    ("method: simpo\nlearning_rate: abc", "c.yaml: learning_rate: expected a number, got 'abc'."),
    ("method: simpo\nper_device_train_batch_size: 2.5",
     "c.yaml: per_device_train_batch_size: expected a whole number, got 2.5."),
    ("method: simpo\nmax_length: [512]", "c.yaml: max_length: expected a whole number, got [512]."),
    ("method: simpo\nuse_peft: maybe", "c.yaml: use_peft: expected true or false, got 'maybe'."),
    ("method: simpo\ntruncation_mode: [keep_end]",
     "c.yaml: truncation_mode: expected a single value, got ['keep_end']."),
    ("method: simpo\ngradient_accumulation_steps: 0", "c.yaml: gradient_accumulation_steps must be at least 1, got 0."),
    ("method: simpo\nmax_completion_length: 0", "c.yaml: max_completion_length must be at least 1 (or unset), got 0."),
    ("method: simpo\ncolumn_mapping: {chosen: answer, rejected: answer}",
     "c.yaml: column_mapping {'chosen': 'answer', 'rejected': 'answer'} takes two roles from one column; map each "
     "to its own column."),
])
def test_11_bad_configs(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert refusal(load_config, str(path)) == f"{tmp_path}/{message}"


def test_11_missing_model_folder(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(4))
    args = ["train", "--model_name_or_path", str(tmp_path / "no_model"), "--dataset_name", data, "--method", "simpo",
            "--output_dir", str(tmp_path / "out")]
    assert main(args) == 2  # a PrefoptError, before the data or any weights load
    err = capsys.readouterr().err
    assert str(tmp_path / "no_model") in err and "does not exist" in err and "model_name_or_path" in err


def test_11_unreadable_data_files(tmp_path):
    good = json.dumps(PAIR)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(f'{good}\n{good}\n{{"prompt": "q", "chosen": \n{good}\n')
    assert refusal(load, str(bad_line)) == (
        f"{bad_line} line 3: not valid JSON (Expecting value at column 26). JSON Lines hold one object per line, "
        '{"prompt": ..., "chosen": ..., "rejected": ...}; fix or remove that line.')
    null_line = tmp_path / "null.jsonl"  # pyarrow's reader would crash the process on this one
    null_line.write_text(f"null\n{good}\n")
    assert refusal(load, str(null_line)).startswith(f"{null_line} line 1: not a JSON object but null.")
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(good.encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert refusal(load, str(not_utf8)).startswith(f"{not_utf8} line 2: not UTF-8 text (invalid continuation byte")
    corrupt = tmp_path / "cut.parquet"
    Dataset.from_list(pairs(3)).to_parquet(str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:-20])
    message = refusal(load, str(corrupt))
    assert message.startswith(f"{corrupt}: could not be read (ArrowInvalid: ")
    assert message.endswith("check that it is a complete, valid parquet file (export it again if it was cut short).")


# ---------------------------------------------------------------------------------------------
# Issue 11, item 5: data that would train the wrong thing silently


def system(text):
    return {"role": "system", "content": text}


def tool(text):
    return {"role": "tool", "content": text}


IN_ANSWER = ("inside the answer: every message of an answer is scored as the model's reply, so this turn would be "
             "trained on as the model's own words.")
MOVE_TO_PROMPT = ("Move it, and the messages before it, into the prompt column (the conversation up to the answer), "
                  "keeping only the assistant's messages in chosen and rejected.")


def test_i11_5_turns_inside_the_answer_are_refused(toks, tmp_path):
    chat = {"prompt": [user("Sort: 2 1")], "chosen": [assistant("1 2")], "rejected": [assistant("2 1")]}
    cases = [  # (the turn's role, column, index), the row
        (("system", "chosen", 0), {**chat, "chosen": [system("Be brief."), assistant("1 2")]}),
        (("user", "chosen", 1), {**chat, "chosen": [assistant("1 2"), user("sure?"), assistant("1 2")]}),
        (("tool", "rejected", 1), {**chat, "rejected": [assistant("sorting"), tool("[2, 1]"), assistant("2 1")]}),
    ]
    for (role, column, k), bad in cases:
        path = write_jsonl(tmp_path / f"{role}.jsonl", [chat, bad])
        assert refusal(load, path) == (f"{path}[train] row 1: column '{column}', message {k} is from the {role}, "
                                       f"{IN_ANSWER} {MOVE_TO_PROMPT}")
    # no prompt column: the prompt is the shared history, so the user's turn after diverging replies is scored
    diverged = {"chosen": [system("Be brief."), user("Sort: 2 1"), assistant("1 2"), user("sure?"), assistant("yes")],
                "rejected": [system("Be brief."), user("Sort: 2 1"), assistant("2 1"), user("sure?"), assistant("no")]}
    path = write_jsonl(tmp_path / "implicit.jsonl", [diverged])
    assert refusal(load, path) == (
        f"{path}[train] row 0: column 'chosen', message 3 is from the user, {IN_ANSWER} With no prompt column, the "
        "prompt is the messages chosen and rejected share (here the first 2 messages) and the answer is the rest; "
        "they first differ at message 2 (chosen: assistant: \"1 2\"; rejected: assistant: \"2 1\"). Make the "
        "conversations identical up to the assistant's final reply, or give the prompt in a 'prompt' column and only "
        "the assistant's messages in chosen and rejected.")
    # what keeps working: a shared multi-turn history is the prompt, and an answer of several assistant messages
    history = [system("Be brief."), user("Sort: 2 1"), assistant("1 2"), user("Sort: 3 1")]
    rows = [{"chosen": history + [assistant("1 3")], "rejected": history + [assistant("3 1")]},
            {"chosen": [user("Sort: 4 2"), assistant("2 4"), assistant("done")],
             "rejected": [user("Sort: 4 2"), assistant("4 2")]}]
    path = write_jsonl(tmp_path / "shared.jsonl", rows)
    train, _ = load(path)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in train] == [
        (history, [assistant("1 3")], [assistant("3 1")]),
        ([user("Sort: 4 2")], [assistant("2 4"), assistant("done")], [assistant("4 2")])]
    tokenizer = toks["chat"]
    prepared = prepare(config(tmp_path, path), tokenizer)
    scored = [tokenizer.decode(r["chosen_ids"]) for r in prepared.train]
    # only the assistant's words (and the template's turn markers between them) are scored
    assert scored == ["1 3<|im_end|>\n<|endoftext|>",
                      "2 4<|im_end|>\n<|im_start|>assistant\ndone<|im_end|>\n<|endoftext|>"]


ROLE_TEMPLATE = (  # names ipython (as Llama 3.1's does) and refuses a system message (as Gemma's does)
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif m.role in ['ipython'] %}<tool>{{ m['content'] }}</tool>{% else %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_i11_5_roles_the_template_does_not_know(toks, tmp_path):
    rows = make_rows(3, 0, chat=True)
    narrator = {**rows[2], "prompt": [{"role": "narrator", "content": "Night falls."}, *rows[2]["prompt"]]}
    path = write_jsonl(tmp_path / "narrator.jsonl", rows[:2] + [narrator])
    assert refusal(prepare, config(tmp_path, path), toks["chat"]) == (
        f"{path}[train] row 2: column 'prompt', message 0 has the role 'narrator', which the chat template does not "
        "know: it would be rendered as a turn the model was never taught. Roles accepted: system, user, assistant, "
        "tool. Give it one of those (words addressed to the model are a system or user message), or remove the "
        "message.")
    # tool results are accepted (here the prompt ends with one), with the ChatML template rendering any role
    with_tool = {**rows[2], "prompt": [*rows[2]["prompt"], assistant("calling sort"), tool("[0, 4, 6]")]}
    path = write_jsonl(tmp_path / "tool.jsonl", rows[:2] + [with_tool])
    assert prepare(config(tmp_path, path), toks["chat"]).report["train"]["kept"] == 3
    # a role the template names is accepted, and listed; the template's own refusal names the row
    tokenizer = train_tokenizer(task_corpus(), vocab_size=300, chat_template=None)
    setup_chat_template(tokenizer, ROLE_TEMPLATE)
    ipython = {**rows[2], "prompt": [*rows[2]["prompt"], {"role": "ipython", "content": "[0, 4, 6]"}, user("So?")]}
    (row,), _ = tokenized([ipython], tokenizer)
    assert tokenizer.decode(row["prompt_ids"]).endswith("<tool>[0, 4, 6]</tool><user>So?<assistant>")
    message = refusal(tokenized, [narrator], tokenizer)
    assert "Roles accepted: system, user, assistant, tool, ipython." in message
    with_system = {**rows[2], "prompt": [system("Be brief."), *rows[2]["prompt"]]}
    assert refusal(tokenized, [with_system], tokenizer) == (
        "mem[train] row 0: the chat template cannot render this conversation (System role not supported); change "
        "the row's messages to what the template accepts, or use another chat_template.")
    setup_chat_template(tokenizer, "{% for m in messages %}{{ m['content'] }{% endfor %}")
    assert refusal(tokenized, rows[:1], tokenizer) == (
        "the chat template is not valid Jinja (line 1: unexpected '}'); fix chat_template, or the template saved "
        "with the tokenizer.")


def test_i11_5_test_split_size_below_one_pair(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(20))
    assert refusal(load, path, test_split_size=0.01) == (
        "test_split_size 0.01 of 20 training pairs asks for 0.2 of a pair, less than one, so no pair is held out for "
        "evaluation at that share. Give a share of at least 1/20, a number of pairs (test_split_size: 1 or more), or "
        "remove test_split_size to train without a held-out split.")
    train, evals = load(path, test_split_size=0.05)  # exactly one pair: 0.05 × 20
    assert (len(train), len(evals)) == (19, 1)
    train, evals = load(path, test_split_size=2)  # a number of pairs
    assert (len(train), len(evals)) == (18, 2)
    assert refusal(load, path, test_split_size=2.5) == (
        "test_split_size 2.5: a value of 1 or more is a number of pairs to hold out, so it must be whole; give a "
        "whole number, or a share below 1.")


def test_i11_5_sharegpt_messages_name_what_was_found(toks, tmp_path):
    fix = ("rename the keys from → role and value → content, and the roles human → user and gpt → assistant (system "
           "stays system); prompt, chosen and rejected are each a list of {role, content} messages")
    sharegpt = {"prompt": [{"from": "human", "value": "Sort: 2 1"}], "chosen": [{"from": "gpt", "value": "1 2"}],
                "rejected": [{"from": "gpt", "value": "2 1"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [sharegpt])
    assert refusal(load, path) == (
        f"{path}[train] row 0: column 'prompt' holds a list whose item 0 is written {{from, value}} (ShareGPT style), "
        f"not {{role, content}}. prefopt reads chat messages as {{role, content}}: {fix}. Accepted schemas: {SCHEMAS}.")
    # LLaMA-Factory's preference rows: the history in `conversations`, each answer one message
    factory = {"conversations": [{"from": "human", "value": "Sort: 2 1"}], "chosen": {"from": "gpt", "value": "1 2"},
               "rejected": {"from": "gpt", "value": "2 1"}}
    path = write_jsonl(tmp_path / "f.jsonl", [factory])
    assert refusal(load, path).startswith(
        f"{path}[train] row 0: column 'chosen' holds one message {{\"from\": \"gpt\", \"value\": \"1 2\"}} written "
        f"{{from, value}} (ShareGPT style), not a list of {{role, content}}. prefopt reads chat messages as "
        f"{{role, content}}: {fix}.")
    # one ShareGPT message among {role, content} ones: in a JSON file, a column of mixed types
    good = {"prompt": [user("Sort: 2 1")], "chosen": [assistant("1 2")], "rejected": [assistant("2 1")]}
    mixed = [good, {**good, "chosen": [{"from": "gpt", "value": "1 2"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", mixed)
    assert refusal(load, path) == (
        f"{path}[train] row 1: column 'chosen' holds a list whose item 0 is written {{from, value}} (ShareGPT style), "
        f"not {{role, content}}, but {path}[train] row 0 holds a chat message list. prefopt reads chat messages as "
        f"{{role, content}}: {fix}. Accepted schemas: {SCHEMAS}.")
    # in a dataset whose messages have all four keys (datasets merges the two shapes), the message is named
    assert refusal(tokenized, mixed, toks["chat"]) == (
        f"mem[train] row 1: column 'chosen', message 0 is written {{from, value}} (ShareGPT style), not "
        f"{{role, content}}; {fix}.")
    # keys renamed but not ShareGPT's role names
    renamed = {**good, "chosen": [{"role": "gpt", "content": "1 2"}]}
    path = write_jsonl(tmp_path / "r.jsonl", [renamed])
    assert refusal(load, path) == (
        f"{path}[train] row 0: the last message of 'chosen' is from the gpt ('gpt' is ShareGPT's name for the "
        "assistant: rename human → user, gpt → assistant), not the assistant; each answer must end with the "
        "assistant's reply.")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    tokenizer = train_tokenizer(task_corpus(), vocab_size=300)
    return save_tiny(tiny_model("llama", tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("i11") / "model")


BEFORE_WEIGHTS = {
    "system turn in the answer": ({"chosen": [system("Be brief."), assistant("1 2")]}, {},
                                  "column 'chosen', message 0 is from the system, inside the answer"),
    "unknown role": ({"prompt": [{"role": "narrator", "content": "Sort: 2 1"}]}, {},
                     "column 'prompt', message 0 has the role 'narrator', which the chat template does not know"),
    "ShareGPT messages": ({"prompt": [{"from": "human", "value": "Sort: 2 1"}]}, {},
                          "column 'prompt' holds a list whose item 0 is written {from, value} (ShareGPT style)"),
    "held-out share below one pair": ({}, {"test_split_size": 0.1}, "test_split_size 0.1 of 4 training pairs"),
}


def train_without_weights(model_folder, tmp_path, monkeypatch, change: dict, keys: dict) -> int:
    """`prefopt train` on 4 chat rows with `change` applied to each, stopped where the weights would load."""
    path = write_jsonl(tmp_path / "d.jsonl", [{**r, **change} for r in make_rows(4, 0, chat=True)])

    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("prefopt.pipeline.load_model", load_model)
    args = ["train", "--model_name_or_path", str(model_folder), "--dataset_name", path, "--method", "simpo",
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "1"]
    for key, value in keys.items():
        args += [f"--{key}", str(value)]
    return main(args)


@pytest.mark.parametrize("case", list(BEFORE_WEIGHTS))
def test_i11_5_refused_before_the_weights_load(case, model_folder, tmp_path, monkeypatch, capsys):
    change, keys, message = BEFORE_WEIGHTS[case]
    assert train_without_weights(model_folder, tmp_path, monkeypatch, change, keys) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "data_report.json").exists()


def test_i11_5_the_same_rows_unchanged_reach_the_weights(model_folder, tmp_path, monkeypatch):
    """What makes the test above not vacuous: its rows and command, unchanged, get as far as loading."""
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train_without_weights(model_folder, tmp_path, monkeypatch, {}, {})


# ---------------------------------------------------------------------------------------------
# Property: whatever the rows and the config, pairs that collate, or a PrefoptError


TEXTS = st.one_of(
    st.sampled_from(["Sort: 3 1 2 =", " 1 2 3", " 3 2 1", "é 🙂 中", "<|endoftext|>", "<s>", "<|im_end|>\n", "",
                     " ", "\n\t "]),
    st.text(min_size=1, max_size=20),
    st.text(alphabet="ab 9\n", min_size=200, max_size=800),
)
MESSAGES = st.one_of(*(st.builds(lambda t, role=role: {"role": role, "content": t}, TEXTS)
                       for role in ("user", "assistant", "system")))
PROMPTS = st.builds(lambda history, last: history + [user(last)], st.lists(MESSAGES, max_size=2), TEXTS)
REPLIES = st.builds(lambda t: [assistant(t)], TEXTS)
WELL_FORMED = {
    "text": st.fixed_dictionaries({"prompt": TEXTS, "chosen": TEXTS, "rejected": TEXTS}),
    "chat": st.fixed_dictionaries({"prompt": PROMPTS, "chosen": REPLIES, "rejected": REPLIES}),
    "implicit_chat": st.builds(lambda p, c, r: {"chosen": p + c, "rejected": p + r}, PROMPTS, REPLIES, REPLIES),
}
# anything at all: odd roles, missing or non-string fields, values of every JSON type, other keys
ODD_MESSAGES = st.one_of(
    MESSAGES,
    st.fixed_dictionaries({"role": st.sampled_from(["tool", "", "narrator"]), "content": TEXTS}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]),
                    st.one_of(TEXTS, st.none(), st.integers(), st.lists(TEXTS, max_size=2)), max_size=3),
)
CONVERSATIONS = st.lists(ODD_MESSAGES, max_size=4)
VALUES = st.one_of(TEXTS, CONVERSATIONS, st.none(), st.integers(), st.floats(), st.booleans(),
                   st.lists(TEXTS, max_size=2), st.dictionaries(st.text(max_size=3), TEXTS, max_size=2))
WILD = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "question", "good", "bad", "extra"]), VALUES,
                    max_size=5),
    st.fixed_dictionaries({"prompt": CONVERSATIONS, "chosen": CONVERSATIONS, "rejected": CONVERSATIONS}),
    st.fixed_dictionaries({"chosen": CONVERSATIONS, "rejected": CONVERSATIONS}),
)


@st.composite
def row_sets(draw) -> list[dict]:
    """Rows of one file: well-formed rows of one schema (with blank, special-token, unicode and long
    texts), a third of the time mixed with rows of anything at all."""
    good = WELL_FORMED[draw(st.sampled_from(list(WELL_FORMED)))]
    row = st.one_of(good, good, WILD) if draw(st.integers(0, 2)) == 0 else good
    return draw(st.lists(row, min_size=1, max_size=8))


# valid settings only: refusing bad ones is test_11_bad_configs' job
CONFIG_KEYS = st.fixed_dictionaries({
    "per_device_train_batch_size": st.sampled_from([1, 2]),
    "max_dropped_share": st.sampled_from([1.0, 1.0, 0.5]),
}, optional={
    "max_length": st.one_of(st.none(), st.integers(2, 96)),
    "max_prompt_length": st.one_of(st.none(), st.integers(1, 40)),
    "max_completion_length": st.one_of(st.none(), st.integers(1, 24)),
    "truncation_mode": st.sampled_from(["keep_end", "keep_start"]),
    "column_mapping": st.sampled_from([{"prompt": "question", "chosen": "good", "rejected": "bad"},
                                       {"chosen": "rejected", "rejected": "chosen"}, {"chosen": "good"}]),
    "test_split_size": st.sampled_from([0.25, 1]),
})
FILES = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=row_sets(), keys=CONFIG_KEYS, which=st.sampled_from(["chat", "plain", "pad_eos"]))
def test_any_rows_and_config_prepare_and_collate_or_raise_a_prefopt_error(toks, scratch, rows, keys, which):
    path = write_jsonl(scratch / f"{next(FILES)}.jsonl", rows)
    tokenizer = toks[which]
    try:
        cfg = build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(scratch / "out"),
                            **keys})
        prepared = prepare(cfg, tokenizer)
    except PrefoptError:
        event("refused")  # (pytest --hypothesis-show-statistics shows how often)
        return
    event("prepared")
    data = cfg.data
    for split in (s for s in (prepared.train, prepared.eval) if s is not None):
        features = [dict(r) for r in split]
        for f in features:
            completions = (f["chosen_ids"], f["rejected_ids"])
            assert all(completions) and completions[0] != completions[1]
            if data.max_prompt_length is not None:
                assert len(f["prompt_ids"]) <= data.max_prompt_length
            if data.max_completion_length is not None:
                assert max(map(len, completions)) <= data.max_completion_length
            if data.max_length is not None:
                assert len(f["prompt_ids"]) + max(map(len, completions)) <= data.max_length
        for layout in LAYOUTS:
            batch = collator_for(cfg, tokenizer.pad_token_id, layout)(features[:4])
            scored = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features[:4])
            assert int(batch["score_is_completion"].sum()) == len(batch["score_index"]) == scored
