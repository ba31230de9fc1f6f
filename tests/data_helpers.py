"""Helpers of the data tests (test_data*.py): a word-level tokenizer whose ids can be written by
hand, chat messages, rows as an in-memory dataset or a JSON Lines file, and the rows they share.

Word-level tokenizer ids (`words()`) used in the hand-written cases:
    0 <unk>  1 <s>  2 </s>  3 <|im_start|>  4 <|im_end|>  5 user  6 assistant  7 hi  8 how
    9 are  10 you  11 fine  12 bad  13 thanks  14 go  15 away
"""

import json

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefopt.config import DataArgs
from prefopt.data import tokenize_pairs
from prefopt.rows import normalise

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


PAIR = {"prompt": "how are you", "chosen": " fine thanks", "rejected": " go away"}
NO_DROPS = {"empty_completion": 0, "truncated_to_nothing": 0, "chosen_equals_rejected": 0, "duplicate_pair": 0}
# chat rows of every shape: TRL parity's (test_data.py) and a chat source beside a text one (test_data_sources.py)
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
