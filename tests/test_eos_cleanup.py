"""The EOS clean-up (tokens._end_at_eos), family by family: what TRL 1.16 trains at the end of a chat
completion and what prefopt trains, on each template family as the model ships it
(template_families.py). The table here is the one in `_end_at_eos`'s docstring."""

import os

import datasets
import pytest
from accelerate import PartialState

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.data_utils import maybe_apply_chat_template  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402

from data_helpers import assistant, in_memory, user  # noqa: E402
from prefopt.config import DataArgs  # noqa: E402
from prefopt.data import tokenize_pairs  # noqa: E402
from prefopt.rows import normalise  # noqa: E402
from template_families import family_tokenizer  # noqa: E402

datasets.disable_progress_bars()

ROW = {"prompt": [user("Who reads the old book?")], "chosen": [assistant("The teacher reads it.")],
       "rejected": [assistant("A small bird.")]}

# family: (the last tokens of TRL's chosen completion, prefopt's); "Ċ" is the newline's byte-level token
ENDINGS = {
    "llama3": (["<|eot_id|>"], ["<|eot_id|>"]),  # the turn closes with EOS, nothing after it
    # the turn end is not EOS: EOS appended by both
    "llama3_base_eos": (["<|eot_id|>", "<|end_of_text|>"], ["<|eot_id|>", "<|end_of_text|>"]),
    "mistral": (["</s>"], ["</s>"]),
    "zephyr": (["</s>", "Ċ", "</s>"], ["</s>"]),  # EOS, then the template's newline
    "chatml": (["<|im_end|>", "Ċ", "<|im_end|>"], ["<|im_end|>"]),
    "qwen2_base_eos": (["<|im_end|>", "Ċ", "<|endoftext|>"], ["<|im_end|>", "Ċ", "<|endoftext|>"]),
    "phi3": (["<|end|>", "Ċ", "<|endoftext|>"], ["<|end|>", "Ċ", "<|endoftext|>"]),  # the template's own EOS last
    "phi3_end_eos": (["<|end|>", "Ċ", "<|end|>"], ["<|end|>"]),  # <|end|>\n then the template's eos_token
    "gemma": (["<end_of_turn>", "Ċ", "<eos>"], ["<end_of_turn>", "Ċ", "<eos>"]),
    "gemma_turn_eos": (["<end_of_turn>", "Ċ", "<end_of_turn>"], ["<end_of_turn>"]),
}


def trl_ids(row: dict, tokenizer) -> dict:
    PartialState()
    trainer = CPOTrainer.__new__(CPOTrainer)  # tokenize_row needs only these three attributes
    trainer.processing_class, trainer.max_length, trainer.is_encoder_decoder = tokenizer, 1024, False
    return trainer.tokenize_row(maybe_apply_chat_template(dict(row), tokenizer))


@pytest.mark.parametrize("family", sorted(ENDINGS))
def test_what_trl_and_prefopt_train_at_the_end_of_a_chat_completion(family):
    tokenizer = family_tokenizer(family)
    (ours,), _ = tokenize_pairs(normalise(in_memory([ROW])), tokenizer, DataArgs())
    trl = trl_ids(ROW, tokenizer)
    trl_end, our_end = ENDINGS[family]
    for side in ("chosen", "rejected"):
        full, reference = ours["prompt_ids"] + ours[f"{side}_ids"], trl[f"{side}_input_ids"]
        assert tokenizer.convert_ids_to_tokens(reference[-len(trl_end):]) == trl_end, side
        assert tokenizer.convert_ids_to_tokens(full[-len(our_end):]) == our_end, side
        # everything before the end is TRL's, token for token: the clean-up only drops what follows the first EOS
        assert full == reference[:len(full)], side
        assert len(reference) - len(full) == len(trl_end) - len(our_end), side
        assert ours["prompt_ids"] == trl["prompt_input_ids"], side


def test_text_completions_lose_trailing_whitespace_and_repeated_eos_after_the_first():
    tokenizer = family_tokenizer("zephyr")
    rows = [{"prompt": "The cat sees", "chosen": " a red ball.</s>\n", "rejected": " two apples.</s></s>"}]
    (ours,), _ = tokenize_pairs(normalise(in_memory(rows)), tokenizer, DataArgs())
    trl = trl_ids(rows[0], tokenizer)
    assert tokenizer.convert_ids_to_tokens(trl["chosen_input_ids"][-3:]) == ["</s>", "Ċ", "</s>"]
    assert tokenizer.convert_ids_to_tokens(trl["rejected_input_ids"][-2:]) == ["</s>", "</s>"]
    assert ours["prompt_ids"] + ours["chosen_ids"] == trl["chosen_input_ids"][:-2]
    assert ours["prompt_ids"] + ours["rejected_ids"] == trl["rejected_input_ids"][:-1]
