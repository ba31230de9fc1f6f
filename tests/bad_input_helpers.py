"""Helpers of the bad-input tests (test_bad_input*.py): the tokenizers they prepare with, chat
messages, a JSON Lines file and a config for it, the refusal a call raises, loading and tokenizing
rows, and distinct text pairs."""

import json

import pytest
from datasets import Dataset

from prefopt.config import DataArgs, DatasetSource, build_config
from prefopt.data import load_raw, normalise, tokenize_pairs
from prefopt.demo import task_corpus
from prefopt.errors import PrefoptError
from prefopt.tiny import train_tokenizer


def tokenizers() -> dict:
    """The tokenizers of the `toks` fixtures, by name."""
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
