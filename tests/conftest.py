"""One thread everywhere in the suite, on every machine; and the tiny workspace most tests train in.

How a float32 reduction is split over threads sets its order of summation, so the same test
computes slightly different numbers on a 2-core and on a 64-core machine. The tolerances in
these tests are derived for round-off of one summation order against another and checked
against measured deviations; with one thread in the test process and in every process it starts
(`torchrun`, `accelerate launch`, `deepspeed` and their workers inherit the environment), what
was measured here is what runs everywhere.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

# datasets counts each local load with a request to its download counter: nothing in the suite goes out
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@dataclass
class Workspace:
    """A tiny model and demo pairs, built offline in `root`:

        root/model/                 a tiny Llama (seed 0) and its tokenizer, trained on the demo task
                                    (vocabulary 300, ChatML template)
        root/data/<split>.jsonl     demo pairs, plain text or chat messages
        root/config.yaml            `config`: model_name_or_path, dataset_mixer and dataset_splits
                                    pointing at them, and the keys the test gave
    """

    root: Path
    config: dict
    tokenizer: object

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def data(self) -> Path:
        return self.root / "data"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """`workspace(name, {split: (pairs, seed)}, chat=False, **config)`: a new Workspace in a fresh
    folder named after `name`, with `pairs` demo rows (`make_rows(pairs, seed, chat=chat)`) per
    split; session-scoped so module-scoped fixtures can build theirs with it."""
    from prefopt.demo import make_rows, task_corpus
    from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

    def build(name: str, splits: dict[str, tuple[int, int]], chat: bool = False, **config) -> Workspace:
        root = tmp_path_factory.mktemp(name)
        tokenizer = train_tokenizer(task_corpus(), vocab_size=300)
        save_tiny(tiny_model("llama", tokenizer, seed=0), tokenizer, root / "model")
        (root / "data").mkdir()
        for split, (n, seed) in splits.items():
            rows = make_rows(n, seed, chat=chat)
            (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"model_name_or_path": str(root / "model"), "dataset_mixer": {str(root / "data"): 1.0},
                  "dataset_splits": list(splits), **config}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        return Workspace(root, config, tokenizer)

    return build
