"""Bad input is refused before any weights load, with a message naming the file, split, row and
column or key, and the fix; or, where the issue allows it, dropped and counted in the report.

One test per item of the issue ("Trust"); some items are also asserted elsewhere, as noted:

 1 missing or misnamed columns           test_1_missing_or_misnamed_columns
                                         (and test_data_sources.py::test_error_missing_column)
 2 mixed types in a column or a row      test_2_mixed_types_name_the_row_and_column
                                         (and test_data_sources.py::test_error_mixed_types)
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

Issue 11 ("Trust, round 2"), item 5, data that would train the wrong thing silently, is
test_bad_input_silent.py; the property test on random rows and configs, test_bad_input_property.py.
"""

import json

import datasets
import pytest
import torch
from datasets import Dataset

from bad_input_helpers import (
    PAIR,
    assistant,
    config,
    load,
    pairs,
    refusal,
    tokenized,
    tokenizers,
    user,
    write_jsonl,
)
from helpers import make_trainer
from prefopt.cli import main
from prefopt.collate import LAYOUTS, collator_for
from prefopt.config import DataArgs, DatasetSource, build_config, load_config
from prefopt.data import SCHEMAS, format_report, load_raw, prepare, setup_chat_template, write_report
from prefopt.demo import make_rows, task_corpus
from prefopt.step import loss, score
from prefopt.tiny import tiny_model, train_tokenizer

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def toks():
    return tokenizers()


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
    assert refusal(load, str(empty)) == (f"{empty}: the file holds no rows; give a file with rows in "
                                         "it (preference pairs; prompts for prefopt pairs).")
    no_rows = tmp_path / "none.parquet"
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(no_rows))
    assert refusal(load, str(no_rows)) == (f"{no_rows}: the file holds no rows; give a file with rows "
                                           "in it (preference pairs; prompts for prefopt pairs).")
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
