"""Trackers through the Trainer's integrations: `report_to: tensorboard` writes real event files
with every metric, read back here."""

import numpy

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prefopt.config import build_config
from prefopt.pipeline import train


def test_tensorboard_event_files_hold_the_metrics(workspace, tmp_path):
    ws = workspace("trackers", {"train": (8, 0), "test": (4, 0)})
    out = tmp_path / "out"
    result = train(build_config({
        **ws.config, "method": "simpo", "max_steps": 3, "per_device_train_batch_size": 4,
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
