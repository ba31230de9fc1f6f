"""Trackers through the Trainer's integrations: `report_to: tensorboard` writes real event files
with every metric, read back here."""

import json

import numpy

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prefopt.config import build_config
from prefopt.demo import make_rows, task_corpus
from prefopt.pipeline import train
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    save_tiny(tiny_model("llama", tok, seed=0), tok, tmp_path / "model")
    (tmp_path / "data").mkdir()
    for split, n in (("train", 8), ("test", 4)):
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, 0)))
    out = tmp_path / "out"
    result = train(build_config({
        "model_name_or_path": str(tmp_path / "model"), "dataset_mixer": {str(tmp_path / "data"): 1.0},
        "dataset_splits": ["train", "test"], "method": "simpo", "max_steps": 3, "per_device_train_batch_size": 4,
        "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 3, "save_strategy": "no",
        "report_to": "tensorboard", "output_dir": str(out)}), log=lambda *a: None)
    events = list(out.rglob("events.out.tfevents.*"))  # output_dir/runs/<date_host>/
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/logps/chosen", "train/lengths/chosen",
            "eval/loss", "eval/rewards/margins"} <= tags
    logged = [x for x in result.trainer.state.log_history if "loss" in x and "train_runtime" not in x]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss")] == [float(numpy.float32(x["loss"])) for x in logged]
