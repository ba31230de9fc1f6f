"""prefopt.data: token ids equal TRL 1.16's, hand-written ids, schemas, the chat template. Loading
is test_data_sources.py; the report, the template prepare installs and the cache key,
test_data_prepare.py.

The hand-written ids are those of data_helpers.words (its table in data_helpers.py).
"""

import os

import datasets
import pytest
from accelerate import PartialState

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402

from data_helpers import CHAT_ROWS, NO_DROPS, PAIR, assistant, in_memory, tokenize, user, words  # noqa: E402
from prefopt.errors import PrefoptError  # noqa: E402
from prefopt.rows import normalise  # noqa: E402
from prefopt.templates import setup_chat_template  # noqa: E402
from prefopt.tiny import default_corpus, train_tokenizer  # noqa: E402

datasets.disable_progress_bars()


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
