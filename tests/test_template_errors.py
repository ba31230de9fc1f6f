"""A chat template that raises is refused through data.prepare, the real path (rows rendered inside
datasets.map, also in worker processes): one PrefoptError naming the file, split and row, the
template's own message, and the fix; never a jinja2 traceback."""

import pytest

from bad_input_helpers import assistant, config, refusal, user, write_jsonl
from prefopt.data import prepare
from template_families import family_tokenizer

ROWS = [
    {"prompt": [user("Who reads the old book?")], "chosen": [assistant("The teacher.")],
     "rejected": [assistant("A bird.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Who paints?")],
     "chosen": [assistant("Her sister.")], "rejected": [assistant("The robot.")]},
]


@pytest.mark.parametrize("workers", [None, 2])
def test_a_system_turn_gemma_refuses_names_the_row_and_the_fix(tmp_path, workers):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    keys = {"preprocessing_num_workers": workers} if workers else {}
    message = refusal(prepare, config(tmp_path, path, **keys), family_tokenizer("gemma"))
    assert message == (
        f"{path}[train] row 1: the chat template cannot render this conversation (System role not supported); "
        "remove the system turns from the rows (or fold them into the first user message), or use a chat_template "
        "that takes a system role.")


def test_an_inserted_system_turn_the_template_refuses_names_the_key(tmp_path):
    # takes a system turn (so one is inserted), but not before a conversation of more than one question
    template = ("{% if messages[0]['role'] == 'system' and messages | selectattr('role', 'equalto', 'user') | list "
                "| length > 1 %}"
                "{{ raise_exception('A system turn takes one question') }}{% endif %}"
                "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [ROWS[0], {"prompt": [user("Hi"), assistant("Hello."), user("Who helps?")],
                      "chosen": [assistant("Our team.")], "rejected": [assistant("No one.")]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tokenizer = family_tokenizer("zephyr", template=template)
    message = refusal(prepare, config(tmp_path, path, auto_insert_empty_system_msg=True), tokenizer)
    assert message == (
        f"{path}[train] row 1: the chat template cannot render this conversation (A system turn takes one question); "
        "it opens with the empty system turn auto_insert_empty_system_msg inserts: set auto_insert_empty_system_msg: "
        "false, or use a chat_template that takes a system role.")
    assert prepare(config(tmp_path, path), tokenizer).report["train"]["kept"] == 2  # without it, both render


def test_a_template_failing_on_a_row_is_refused_with_the_row(tmp_path):
    template = "{% for m in messages %}{{ m['content'] + m['score'] }}{% endfor %}"  # no such key: undefined + str
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    message = refusal(prepare, config(tmp_path, path), family_tokenizer("zephyr", template=template))
    assert message.startswith(f"{path}[train] row 0: the chat template cannot render this conversation (")
    assert message.endswith("change the row's messages to what the template accepts, or use another chat_template.")
