"""Every example in configs/ is headed by its launch command, loads, explains itself, and trains
a step on a tiny local model with local data (or, asking for what this machine lacks, stops
before loading with the reason)."""

import json
from pathlib import Path

import pytest
import torch

from prefopt.cli import main
from prefopt.config import load_config
from prefopt.demo import make_rows, task_corpus
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    save_tiny(tiny_model("llama", tok, seed=0), tok, root / "model")
    (root / "data").mkdir()
    for split, n in (("train", 8), ("test", 4)):
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, 1, chat=True)))
    return root


def test_there_is_one_example_per_method():
    methods = {load_config(str(p)).objective.method for p in CONFIGS}
    assert methods == {"simpo", "cpo_simpo", "alphapo", "cpo", "orpo"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config(path, local, tmp_path, capsys):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    launch = [line for line in header if "prefopt train" in line]
    assert launch and f"configs/{path.name}" in launch[0], "the header names how to launch this file"
    assert main(["config", "explain", str(path)]) == 0
    overrides = ["--model_name_or_path", str(local / "model"), "--dataset_mixer", json.dumps({str(local / "data"): 1.0}),
                 "--dataset_splits", "[train, test]", "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "out"),
                 "--test_split_size", "0"]  # the data's own test split (a share of 8 rows holds out less than a pair)
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    cfg = load_config(str(path))
    if (cfg.model.load_in_4bit or cfg.model.load_in_8bit) and not torch.cuda.is_available():
        assert code == 2 and "needs bitsandbytes on a CUDA GPU" in err
        return
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
