"""Issue 11 ("Trust, round 2"), item 5: data that would train the wrong thing silently is refused
before any weights load, with a message naming the file, split, row and column, and the fix.

 a system, user or tool turn inside      test_i11_5_turns_inside_the_answer_are_refused
   the scored answer; the shared         (and test_bad_input.py::test_3, test_data.py::
   history of chosen/rejected kept       test_token_ids_match_trl[*-implicit_chat],
                                         test_implicit_chat_prompt_is_the_shared_history)
 a role the chat template does not know  test_i11_5_roles_the_template_does_not_know
 test_split_size below one pair          test_i11_5_test_split_size_below_one_pair
 ShareGPT {from, value} messages         test_i11_5_sharegpt_messages_name_what_was_found
 each of these before the weights load   test_i11_5_refused_before_the_weights_load,
                                         test_i11_5_the_same_rows_unchanged_reach_the_weights
"""

import datasets
import pytest

from bad_input_helpers import assistant, config, load, pairs, refusal, tokenized, tokenizers, user, write_jsonl
from prefopt.cli import main
from prefopt.data import SCHEMAS, prepare, setup_chat_template
from prefopt.demo import make_rows, task_corpus
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def toks():
    return tokenizers()


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
        "mem[train] row 0: the chat template cannot render this conversation (System role not supported); remove "
        "the system turns from the rows (or fold them into the first user message), or use a chat_template that "
        "takes a system role.")
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
    # LLaMA-Factory's preference rows are read as they are (tests/test_llamafactory_data.py)
    factory = {"conversations": [{"from": "human", "value": "Sort: 2 1"}], "chosen": {"from": "gpt", "value": "1 2"},
               "rejected": {"from": "gpt", "value": "2 1"}}
    path = write_jsonl(tmp_path / "f.jsonl", [factory])
    train, _ = load(path)
    assert train[0]["chosen"] == [assistant("1 2")] and train[0]["prompt"] == [user("Sort: 2 1")]
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
