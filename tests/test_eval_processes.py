"""Evaluation counts each held-out pair once on any number of processes. With 15 pairs over 2
processes the evaluation sampler fills the last round of batches with a pair from the start of the
set (every process must get as many batches); that duplicate must not be counted — in the trainer's
eval metrics nor in `prefopt eval`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace(
        "evalproc", {"train": (8, 0), "test": (15, 1)},  # 15: divides by neither 2 × 2 nor 2 × 8
        method="cpo_simpo",  # an NLL term: eval_loss normalised over all held-out tokens
        max_steps=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        eval_strategy="steps",
        eval_steps=1,
        eval_on_start=True,  # evaluated before any update: both runs score the very same weights
        save_strategy="no",
        report_to="none",
        seed=1,
    ).root


def _launch(n: int) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", "prefopt"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
            str(free_port()), "-m", "prefopt"]


def _first_eval(ws, out: Path, n: int) -> dict:
    done = subprocess.run(_launch(n) + ["train", str(ws / "config.yaml"), "--output_dir", str(out),
                                        "--per_device_train_batch_size", str(2 // n)],
                          env=ENV, capture_output=True, text=True, timeout=600, cwd=ws)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (line,) = [x for x in lines if "eval_loss" in x and x["step"] == 0]
    return {k: v for k, v in line.items() if k not in TIMING}


# Both runs score the same weights on the same 15 pairs. The per-pair values come from forwards of
# other padded shapes where a batch differs (pair 14 alone, or beside the duplicate), which changes
# float32 round-off of a row only (~1e-7 relative); means over 15 pairs, summed in float64, agree
# to well within 1e-5. Accuracy is a count of pairs: equal exactly (no margin here is within 1e-5 of 0).
REL = 1e-5


def test_trainer_eval_metrics_equal_one_process(ws, tmp_path):
    one, two = _first_eval(ws, tmp_path / "one", 1), _first_eval(ws, tmp_path / "two", 2)
    assert one.keys() == two.keys()
    assert two["eval_rewards/accuracies"] == one["eval_rewards/accuracies"]
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=REL, abs=1e-9), key


def test_prefopt_eval_equals_one_process(ws, tmp_path):
    def report(n):
        path = tmp_path / f"report{n}.json"
        done = subprocess.run(_launch(n) + ["eval", "--model", str(ws / "model"), "--data", str(ws / "data"),
                                            "--split", "test", "--output", str(path)],
                              env=ENV, capture_output=True, text=True, timeout=600, cwd=ws)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(path.read_text())["preference"]["model"]

    one, two = report(1), report(2)
    assert one["pairs"] == two["pairs"] == 15
    assert two["accuracy"] == one["accuracy"]
    for key in ("logps_chosen", "logps_rejected", "length_chosen", "length_rejected", "length_baseline_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=REL), key
    for key, value in one["margin"].items():
        assert two["margin"][key] == pytest.approx(value, rel=REL, abs=1e-9), key
