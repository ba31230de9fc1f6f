"""LLaMA-Factory's preference data trains without a converter: its sharegpt ranking rows (detected,
or named by `data_format: sharegpt`), its alpaca ranking rows and its `dataset:` names resolved
through dataset_dir/dataset_info.json. Each is compared with the same pairs written in prefopt's
own chat format: the token ids must be equal, not merely similar."""

import json

import pytest
import yaml

from bad_input_helpers import assistant, refusal, tokenizers, user, write_jsonl
from prefopt.cli import main
from prefopt.config import DataArgs, DatasetSource, build_config, load_config
from prefopt.data import load_raw, prepare, tokenize_pairs
from prefopt.demo import make_rows
from prefopt.tiny import save_tiny, tiny_model

SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


def system(text):
    return {"role": "system", "content": text}


# prefopt's chat rows: one turn; a system turn and history; a tool call and its result
CHAT = [
    {"prompt": [user("Sort: 3 1 2")], "chosen": [assistant("1 2 3")], "rejected": [assistant("1 3 2")]},
    {"prompt": [system("Be brief."), user("Sort: 2 1"), assistant("1 2"), user("Sort: 5 4")],
     "chosen": [assistant("4 5")], "rejected": [assistant("5 4")]},
    {"prompt": [user("Sort: 9 7"), assistant('{"name": "sort", "arguments": [9, 7]}'), {"role": "tool",
                                                                                        "content": "7 9"}],
     "chosen": [assistant("7 9")], "rejected": [assistant("9 7")]},
]


def as_sharegpt(row: dict, role="from", content="value", names=SHAREGPT, function_call=True) -> dict:
    """A prefopt chat row written as LLaMA-Factory's sharegpt ranking row (an assistant turn followed
    by a tool result is its function_call)."""
    turns, prompt = [], row["prompt"]
    for k, m in enumerate(prompt):
        name = names[m["role"]]
        if function_call and m["role"] == "assistant" and k + 1 < len(prompt) and prompt[k + 1]["role"] == "tool":
            name = "function_call"
        turns.append({role: name, content: m["content"]})
    answer = {c: {role: names["assistant"], content: row[c][0]["content"]} for c in ("chosen", "rejected")}
    return {"conversations": turns, **answer}


@pytest.fixture(scope="module")
def chat_tokenizer():
    return tokenizers()["chat"]  # ChatML


def ids(data: DataArgs, tokenizer) -> list[tuple]:
    train, _ = load_raw(data, seed=0)
    kept, _ = tokenize_pairs(train, tokenizer, data)
    return [(r["row"], r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in kept]


def file_ids(path: str, tokenizer, **data) -> list[tuple]:
    return ids(DataArgs(train_datasets=[DatasetSource(path=path)], **data), tokenizer)


def test_sharegpt_rows_are_detected_and_tokenize_as_the_same_chat_rows(tmp_path, chat_tokenizer):
    reference = file_ids(write_jsonl(tmp_path / "chat.jsonl", CHAT), chat_tokenizer)
    assert len(reference) == 3
    detected = file_ids(write_jsonl(tmp_path / "lf.jsonl", [as_sharegpt(r) for r in CHAT]), chat_tokenizer)
    assert detected == reference
    # a top-level system column instead of the system turn; a .json array as LLaMA-Factory ships them
    rows = [as_sharegpt(r) for r in CHAT]
    rows[1] = {**rows[1], "conversations": rows[1]["conversations"][1:], "system": "Be brief."}
    (tmp_path / "lf.json").write_text(json.dumps(rows))
    assert file_ids(str(tmp_path / "lf.json"), chat_tokenizer) == reference
    # named explicitly: the same
    cfg = lf_config(tmp_path, datasets=[{"path": str(tmp_path / "lf.json")}], data_format="sharegpt")
    assert cfg.data.train_datasets[0].format == {"formatting": "sharegpt"}
    assert ids(cfg.data, chat_tokenizer) == reference


def test_openai_style_messages_are_read_by_their_tags(tmp_path, chat_tokenizer):
    reference = file_ids(write_jsonl(tmp_path / "chat.jsonl", CHAT[:2]), chat_tokenizer)
    names = {"user": "user", "assistant": "assistant", "system": "system"}
    rows = [{"messages": as_sharegpt(r, "role", "content", names)["conversations"],
             **{c: as_sharegpt(r, "role", "content", names)[c] for c in ("chosen", "rejected")}} for r in CHAT[:2]]
    assert file_ids(write_jsonl(tmp_path / "openai.jsonl", rows), chat_tokenizer) == reference  # detected
    # and named through dataset_info.json's tags, as LLaMA-Factory's own OpenAI-style entries do; also for eval
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    folder = dataset_info(tmp_path, {"oa": {"file_name": "openai.jsonl", "formatting": "sharegpt", "ranking": True,
                                            "columns": {"messages": "messages"}, "tags": tags}})
    data = lf_config(tmp_path, dataset="oa", eval_dataset="oa", dataset_dir=folder).data
    assert ids(data, chat_tokenizer) == reference
    _, evals = load_raw(data, seed=0)
    assert [r["prompt"] for r in evals] == [r["prompt"] for r in CHAT[:2]]


def dataset_info(folder, entries: dict) -> str:
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return str(folder)


def lf_config(tmp_path, **keys):
    return build_config({"method": "simpo", "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 1,
                         **keys})


def test_dataset_info_tags_and_columns_are_honoured(tmp_path, chat_tokenizer):
    reference = file_ids(write_jsonl(tmp_path / "chat.jsonl", CHAT), chat_tokenizer)
    names = {"user": "me", "assistant": "bot", "system": "sys", "tool": "result"}
    rows = [as_sharegpt(r, "speaker", "text", names, function_call=False) for r in CHAT]
    rows = [{"dialog": r["conversations"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    write_jsonl(tmp_path / "custom.jsonl", rows)
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot",
            "system_tag": "sys", "observation_tag": "result"}
    folder = dataset_info(tmp_path, {"custom": {
        "file_name": "custom.jsonl", "formatting": "sharegpt", "ranking": True, "tags": tags,
        "columns": {"messages": "dialog", "chosen": "good", "rejected": "bad"}}})
    cfg = lf_config(tmp_path, dataset="custom", dataset_dir=folder)
    [src] = cfg.data.train_datasets
    assert src.path == f"{folder}/custom.jsonl" and src.format["tags"] == tags
    assert f"data: LLaMA-Factory dataset custom from {folder}/dataset_info.json (relative to the working " \
           "directory)" in cfg.notes
    assert ids(cfg.data, chat_tokenizer) == reference


def test_alpaca_ranking_rows_through_dataset_info(tmp_path, chat_tokenizer):
    rows = [
        {"instruction": "Sort", "input": "3 1 2", "chosen": "1 2 3", "rejected": "1 3 2"},
        {"instruction": "Sort: 5 4", "input": "", "chosen": "4 5", "rejected": "5 4", "sys": "Be brief.",
         "past": [["Sort: 2 1", "1 2"]]},
    ]
    write_jsonl(tmp_path / "alpaca.jsonl", rows)
    # LLaMA-Factory joins instruction and input with "\n", leaving out an empty one
    chat = [{"prompt": [user("Sort\n3 1 2")], "chosen": [assistant("1 2 3")], "rejected": [assistant("1 3 2")]},
            {"prompt": [system("Be brief."), user("Sort: 2 1"), assistant("1 2"), user("Sort: 5 4")],
             "chosen": [assistant("4 5")], "rejected": [assistant("5 4")]}]
    reference = file_ids(write_jsonl(tmp_path / "chat.jsonl", chat), chat_tokenizer)
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
               "system": "sys", "history": "past"}
    folder = dataset_info(tmp_path, {"pairs": {"file_name": "alpaca.jsonl", "ranking": True, "columns": columns}})
    cfg = lf_config(tmp_path, dataset="pairs", dataset_dir=folder)
    assert cfg.data.train_datasets[0].format == {"formatting": "alpaca", "columns": columns}
    assert ids(cfg.data, chat_tokenizer) == reference
    # with `columns` given, an optional column it leaves out is not read (as LLaMA-Factory): no history
    del columns["history"]
    dataset_info(tmp_path, {"pairs": {"file_name": "alpaca.jsonl", "ranking": True, "columns": columns}})
    train, _ = load_raw(lf_config(tmp_path, dataset="pairs", dataset_dir=folder).data, seed=0)
    assert train[1]["prompt"] == [system("Be brief."), user("Sort: 5 4")]


def test_detection_leaves_other_formats_alone(tmp_path):
    # TRL's conversational rows beside an extra `messages` column: answers are lists, not single messages
    row = {**CHAT[0], "messages": [user("Sort: 3 1 2"), assistant("1 2 3")]}
    train, _ = load_raw(DataArgs(train_datasets=[DatasetSource(path=write_jsonl(tmp_path / "a.jsonl", [row]))]), 0)
    assert train[0]["prompt"] == CHAT[0]["prompt"] and train[0]["chosen"] == CHAT[0]["chosen"]
    # strings beside a `conversations` column: prefopt's text rows (implicit prompt)
    row = {"conversations": [{"from": "human", "value": "x"}], "chosen": "Sort: 1 2", "rejected": "Sort: 2 1"}
    train, _ = load_raw(DataArgs(train_datasets=[DatasetSource(path=write_jsonl(tmp_path / "b.jsonl", [row]))]), 0)
    assert (train[0]["prompt"], train[0]["chosen"], train[0]["rejected"]) == ("Sort:", " 1 2", " 2 1")
    # single ShareGPT answers without the conversation: not LLaMA-Factory's rows, refused with both fixes
    row = {"prompt": [user("Sort: 2 1")], "chosen": {"from": "gpt", "value": "1 2"},
           "rejected": {"from": "gpt", "value": "2 1"}}
    assert sharegpt_refusal(tmp_path, [row]).startswith(
        "f[train] row 0: column 'chosen' holds one message {\"from\": \"gpt\", \"value\": \"1 2\"} written {from, "
        "value} (ShareGPT style), not a list of {role, content}. prefopt reads chat messages as {role, content}: "
        "rename the keys from → role and value → content, and the roles human → user and gpt → assistant (system "
        "stays system); prompt, chosen and rejected are each a list of {role, content} messages. Or, as "
        "LLaMA-Factory's sharegpt ranking rows (read as they are), give the conversation up to the answers as a "
        "'conversations' list beside single-message chosen and rejected.")


def sharegpt_refusal(tmp_path, rows: list[dict], **keys) -> str:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    return refusal(load_raw, lf_config(tmp_path, datasets=[{"path": path}], **keys).data, seed=0).replace(path, "f")


def test_bad_sharegpt_rows_are_refused_by_file_split_row_and_column(tmp_path):
    good = as_sharegpt(CHAT[1])
    turns = good["conversations"]
    unknown = {**good, "conversations": [*turns[:3], {"from": "user", "value": "Sort: 5 4"}]}
    assert sharegpt_refusal(tmp_path, [good, unknown]) == (
        "f[train] row 1: column 'conversations', message 3 is from 'user', which is none of the tags in use: human "
        "(user_tag), gpt (assistant_tag), observation (observation_tag), function_call (function_tag), system "
        "(system_tag). Give it one of those, or name its role in dataset_info.json's tags.")
    assert sharegpt_refusal(tmp_path, [{**good, "conversations": turns[:3]}]) == (
        "f[train] row 0: column 'conversations' ends with the gpt turn; in ranking rows the conversation ends with "
        "the human (or observation) turn that chosen and rejected answer. Move the final gpt reply into chosen and "
        "rejected, or drop the row.")
    assert sharegpt_refusal(tmp_path, [{**good, "conversations": [turns[0], turns[1], turns[3]]}]) == (
        "f[train] row 0: column 'conversations', message 2 is from human where gpt or function_call comes. "
        "LLaMA-Factory's ranking rows, and prefopt, take an optional system turn first, then turns alternating "
        "human (or observation) and gpt (or function_call), ending with the human turn the answers reply to; merge "
        "or drop the turns out of order.")
    assert sharegpt_refusal(tmp_path, [{**good, "conversations": [turns[1], turns[0], turns[3]]}]) == (
        "f[train] row 0: column 'conversations', message 1 is from system where gpt or function_call comes. "
        "LLaMA-Factory's ranking rows, and prefopt, take an optional system turn first, then turns alternating "
        "human (or observation) and gpt (or function_call), ending with the human turn the answers reply to; merge "
        "or drop the turns out of order.")
    # a list of answer messages: not detected as sharegpt, so named explicitly
    listed = {**good, "chosen": [good["chosen"], good["chosen"]]}
    assert sharegpt_refusal(tmp_path, [listed], data_format="sharegpt") == (
        "f[train] row 0: column 'chosen' holds a list of 2 items; in LLaMA-Factory's sharegpt ranking rows each answer is one message {from: gpt, value: "
        "...}: keep only the final reply there (earlier turns belong in the conversation).")
    assert sharegpt_refusal(tmp_path, [{**good, "rejected": {"from": "human", "value": "5 4"}}]) == (
        "f[train] row 0: column 'rejected' is from human, but an answer is the model's: from gpt (or function_call).")
    assert sharegpt_refusal(tmp_path, [{**good, "chosen": {"from": "gpt", "value": 45}}]) == (
        "f[train] row 0: column 'chosen''s 'value' holds the int 45, not a string; give the text there.")
    assert sharegpt_refusal(tmp_path, [{"chosen": "a", "rejected": "b"}], data_format="sharegpt") == (
        "f[train]: no column conversations (the messages column) for LLaMA-Factory's sharegpt ranking rows "
        "(columns found: ['chosen', 'rejected']); name the columns in the default names or in the file.")


def test_bad_alpaca_rows_are_refused(tmp_path):
    rows = [{"instruction": "Sort", "chosen": "1 2", "rejected": "2 1", "history": [["q"]]}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    folder = dataset_info(tmp_path, {"a": {"file_name": "a.jsonl", "ranking": True, "columns": {"history": "history"}}})
    data = lf_config(tmp_path, dataset="a", dataset_dir=folder).data
    assert refusal(load_raw, data, seed=0) == (
        f"{folder}/a.jsonl[train] row 0: column 'history', item 0 is a list of 1 item; the history is a "
        "list of [question, answer] pairs of strings.")


@pytest.mark.parametrize("keys, entries, message", [
    ({"dataset": "my_pair"}, {"my_pairs": {"file_name": "p.json", "ranking": True}, "other": {"file_name": "o.json"}},
     "dataset 'my_pair' is not in {dir}/dataset_info.json (nearest: my_pairs); fix the name or add an entry for it."),
    ({"dataset": "sft"}, {"sft": {"file_name": "p.json"}},
     '{dir}/dataset_info.json: sft has no "ranking": true, so it is not preference data (LLaMA-Factory reads it as '
     'SFT rows); add "ranking": true to its entry if its rows hold chosen and rejected answers, or name a ranking '
     "dataset."),
    ({"dataset": "ms"}, {"ms": {"ms_hub_url": "a/b", "ranking": True}},
     "{dir}/dataset_info.json: ms: ms_hub_url (a ModelScope dataset) cannot be read by prefopt; give a file_name in "
     "dataset_dir or an hf_hub_url."),
    ({"dataset": "p"}, {"p": {"file_name": "p.json", "ranking": True, "formatting": "sharegpt",
                              "columns": {"images": "images"}}},
     "{dir}/dataset_info.json: p: columns.images: prefopt does not train on images; remove it (preference pairs are "
     "read from chosen and rejected)."),
    ({"dataset": "p"}, {"p": {"file_name": "p.json", "ranking": True, "formatting": "sharegpt",
                              "tags": {"speaker_tag": "x"}}},
     "{dir}/dataset_info.json: p: tags.speaker_tag is not known for sharegpt; use role_tag, content_tag, user_tag, "
     "assistant_tag, observation_tag, function_tag, system_tag."),
    ({"dataset": "p", "data_format": "sharegpt"}, {"p": {"file_name": "p.json", "ranking": True}},
     "data_format is sharegpt, but dataset_info.json gives {dir}/p.json formatting alpaca; keep one of them."),
    ({"dataset": "p", "data_format": "alpaca"}, {"p": {"file_name": "p.json", "ranking": True}},
     "data_format 'alpaca' is not known: use sharegpt (LLaMA-Factory's conversations with from/value), or leave "
     "data_format out to detect the rows' format from their columns."),
])
def test_dataset_names_are_resolved_or_refused(tmp_path, keys, entries, message):
    folder = dataset_info(tmp_path, entries)
    assert refusal(lf_config, tmp_path, dataset_dir=folder, **keys) == "config: " + message.format(dir=folder)


def test_dataset_forms_and_companions(tmp_path, monkeypatch):
    assert refusal(lf_config, tmp_path, datasets=[{"path": "x.jsonl"}], dataset_dir=str(tmp_path)) == (
        "config: dataset_dir only goes with dataset.")
    assert refusal(lf_config, tmp_path, dataset="p", dataset_dir=str(tmp_path / "none")) == (
        f"config: {tmp_path}/none/dataset_info.json: not found; `dataset:` names entries of "
        "dataset_dir/dataset_info.json (dataset_dir defaults to data, in the working directory): set dataset_dir to "
        "the folder that holds it.")
    dataset_info(tmp_path, {"a": {"file_name": "a.json", "ranking": True},
                            "hub": {"hf_hub_url": "org/prefs", "ranking": True, "formatting": "sharegpt",
                                    "subset": "en", "split": "test"}})
    monkeypatch.chdir(tmp_path.parent)  # dataset_dir is relative to the working directory, default data
    (tmp_path.parent / "data").mkdir(exist_ok=True)
    dataset_info(tmp_path.parent / "data", {"a": {"file_name": "a.json", "ranking": True}})
    [src] = lf_config(tmp_path, dataset="a").data.train_datasets
    assert src.path == "data/a.json"
    cfg = lf_config(tmp_path, dataset=["a", "hub"], eval_dataset="hub", dataset_dir=tmp_path.name)
    assert [(s.path, s.split, s.name) for s in cfg.data.train_datasets] == [
        (f"{tmp_path.name}/a.json", "train", None), ("org/prefs", "test", "en")]
    assert [(s.path, s.format) for s in cfg.data.eval_datasets] == [("org/prefs", {"formatting": "sharegpt",
                                                                                 "columns": {}})]
    # a resolved config's datasets list carries the format back
    entry = {"path": "data/a.json", "format": {"formatting": "sharegpt", "tags": {"role_tag": "role"}}}
    [src] = lf_config(tmp_path, datasets=[entry]).data.train_datasets
    assert src.format == entry["format"]


def test_a_llamafactory_config_loads_prepares_and_trains(tmp_path, capsys):
    from prefopt.demo import task_corpus
    from prefopt.tiny import train_tokenizer

    tokenizer = train_tokenizer(task_corpus(), vocab_size=300)
    save_tiny(tiny_model("llama", tokenizer, seed=0), tokenizer, tmp_path / "model")
    chat = make_rows(8, 0, chat=True)
    folder = tmp_path / "lf"
    folder.mkdir()
    (folder / "pairs.json").write_text(json.dumps([as_sharegpt(r) for r in chat]))
    dataset_info(folder, {"my_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
                                       "columns": {"messages": "conversations", "chosen": "chosen",
                                                   "rejected": "rejected"}}})
    config = {"model_name_or_path": str(tmp_path / "model"), "dataset": "my_pairs", "dataset_dir": str(folder),
              "method": "simpo", "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
              "logging_steps": 1, "save_strategy": "no", "output_dir": str(tmp_path / "out")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(str(tmp_path / "c.yaml"))
    prepared = prepare(cfg, tokenizer)
    reference = file_ids(write_jsonl(tmp_path / "chat.jsonl", chat), tokenizer)
    assert [(r["row"], r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in prepared.train] == reference
    assert len(reference) == 8
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert "8 of 8 pairs kept" in capsys.readouterr().out


def test_an_entry_reads_history_and_system_only_when_its_columns_name_them(tmp_path):
    """LLaMA-Factory's defaults for the history and system columns are None: an entry without them in
    `columns` trains without them, as there; named, they are read."""
    rows = [{"instruction": "Sort", "chosen": "1 2", "rejected": "2 1", "system": "SYS", "history": [["q", "a"]]}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    for columns, prompt in (({}, [{"role": "user", "content": "Sort"}]),
                            ({"system": "system", "history": "history"},
                             [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}, {"role": "user", "content": "Sort"}])):
        (tmp_path / str(len(columns))).mkdir()
        folder = dataset_info(tmp_path / str(len(columns)), {"a": {"file_name": str(tmp_path / "a.jsonl"),
                                                                   "ranking": True, "columns": columns}})
        train, _ = load_raw(lf_config(tmp_path, dataset="a", dataset_dir=folder).data, seed=0)
        assert train[0]["prompt"] == prompt
