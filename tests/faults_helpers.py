"""Helpers of the fault tests (test_faults*.py): the workspace they run in, `prefopt train` run in
a subprocess (or fault_worker.py, which injects a fault), its outcome checked, a run compared with
an uninterrupted reference, a folder's files snapshotted, a run waited for or killed at a step."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "fault_worker.py")
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second", "total_flos"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def fault_workspace(workspace) -> Path:
    """The root of the tiny workspace the fault tests train in (their `ws` fixtures)."""
    return workspace(
        "faults", {"train": (24, 0), "test": (6, 1)}, method="cpo_simpo", learning_rate=5e-3, seed=3,
        max_steps=8,  # ends mid-epoch (24 pairs, 4 per step)
        per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1, report_to="none",
        eval_strategy="steps", eval_steps=3,  # does not divide max_steps: the final evaluation comes after the loop
        save_steps=2, save_total_limit=2,
    ).root


def run(ws, out, *extra, fault=None, wait=True, cwd=None):
    cmd = ([sys.executable, WORKER] if fault else [sys.executable, "-m", "prefopt"]) + [
        "train", str(ws / "config.yaml"), "--output_dir", str(out), *extra]
    env = {**ENV, "PREFOPT_FAULT": fault} if fault else ENV
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd or ws)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd or ws)


def ok(done):
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    return done


def refused(done, *words):
    assert done.returncode == 2, done.stdout[-1500:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in done.stderr, done.stderr[-3000:]
    return done.stderr


def trajectory(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def assert_same_run(reference: Path, out: Path):
    """Same logged lines (every value) and the same final weights as the reference run. The
    resumed run repeats the reference's arithmetic in one process with the same thread count, data
    order and RNG state (restored from the checkpoint), so the values agree to float32 round-off of
    a reloaded optimizer state (they are in practice bit-identical)."""
    a, b = trajectory(reference), trajectory(out)
    assert [x["step"] for x in b] == [x["step"] for x in a]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (x["step"], key)
    w1, w2 = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-6, atol=1e-7)


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for_step(out: Path, proc, step: int, timeout=300):
    """Until metrics.jsonl shows a train line at `step` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = out / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise AssertionError("the run did not get there")


def kill_after(ws, out: Path, step: int):
    """A run SIGKILLed (nothing saved, nothing flushed) after `step`, held there so that nothing
    after it can have been written."""
    killed = run(ws, out, fault=f"hold:{step}:{out}.never", wait=False)
    wait_for_step(out, killed, step)
    killed.kill()
    killed.wait()
