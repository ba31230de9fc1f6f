"""A crash loses nothing: a run killed with SIGKILL (mid-step, mid-checkpoint, before a checkpoint
is marked complete) and started again with the very same command ends with the same weights and
the same logged trajectory as a run that was never interrupted. Plus: an output_dir holding a
different run is refused, and a non-finite loss or gradient stops training at its step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import AFTER_ADAM_REL, assert_adam_weights_close, assert_logged_close, free_port
from prefopt.config import build_config
from prefopt.errors import PrefoptError
from prefopt.pipeline import train
from prefopt.checkpoints import COMPLETE, checkpoints

ROOT = Path(__file__).resolve().parents[1]
# values that depend on wall-clock time, not on the computation
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second", "total_flos"}


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace(
        "resume", {"train": (24, 0), "test": (8, 1)}, method="cpo_simpo", learning_rate=5e-3, seed=11,
        max_steps=8,  # 2 epochs of 24 pairs at 6 per step: resuming crosses an epoch boundary
        per_device_train_batch_size=3, gradient_accumulation_steps=2, report_to="none",
        logging_steps=3,  # logs straddle checkpoints: what was measured but not logged must survive too
        eval_strategy="steps", eval_steps=4,
        save_steps=2, save_total_limit=1,  # rotation must never leave nothing complete to resume from
    ).root


def _train(ws, out, kill: str | None = None, processes: int = 1, *extra: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as tests/conftest.py
    args = ["train", str(ws / "config.yaml"), "--output_dir", str(out), *extra]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(free_port())]
        # the same 6 pairs per step as one process × 3 × accumulation 2
        args += ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1"]
    else:
        launcher = [sys.executable]
    if kill:
        env["PREFOPT_KILL"] = kill
        cmd = launcher + [str(ROOT / "tests" / "kill_worker.py")] + args
    else:
        cmd = launcher + ["-m", "prefopt"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ws)


def _trajectory(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def assert_same_result(reference, out: Path):
    """The run in `out` logged the reference's lines and ended with its weights, bit for bit. Both
    are one process running the same micro-batches in the same order on one thread
    (tests/conftest.py), and a checkpoint holds every float of the state exactly (weights, Adam
    moments, scheduler, RNG, unlogged metric sums): nothing is summed in another order, so no
    number may differ."""
    trajectory, weights = reference
    assert _trajectory(out) == trajectory
    final = load_file(out / "model.safetensors")
    assert final.keys() == weights.keys()
    assert [n for n in weights if not torch.equal(final[n], weights[n])] == []


@pytest.fixture(scope="module")
def uninterrupted(ws):
    out = ws / "uninterrupted"
    done = _train(ws, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return _trajectory(out), load_file(out / "model.safetensors")


@pytest.mark.parametrize("kill, resumed_from", [
    ("step:5", "checkpoint-4"),  # inside step 6, after checkpoint-4
    ("save:6", "checkpoint-4"),  # checkpoint-6 half written: weights, no optimizer state
    ("mark:6", "checkpoint-4"),  # checkpoint-6 written, not yet marked (and checkpoint-4 not yet rotated out)
    ("step:1", None),  # before the first checkpoint: starts over
])
def test_killed_run_resumes_to_the_same_result(ws, uninterrupted, tmp_path, kill, resumed_from):
    out = tmp_path / "run"
    killed = _train(ws, out, kill)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL
    complete = [p.name for p in checkpoints(out) if (p / COMPLETE).is_file()]
    assert complete == ([resumed_from] if resumed_from else [])
    if kill.startswith(("save", "mark")):
        assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-6" / COMPLETE).exists()

    again = _train(ws, out)  # the very same command
    assert again.returncode == 0, again.stderr[-3000:]
    if resumed_from:
        assert f"resuming from {out / resumed_from}" in again.stdout
        if kill.startswith(("save", "mark")):
            assert f"removing {out / 'checkpoint-6'}" in again.stdout
    else:
        assert "resuming" not in again.stdout

    assert_same_result(uninterrupted, out)


def test_an_output_dir_holding_another_run_is_refused(ws, tmp_path, capsys):
    from prefopt.cli import main

    out = tmp_path / "run"
    args = ["train", str(ws / "config.yaml"), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1",
            "--logging_steps", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--beta", "3.0", "--learning_rate", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} holds a run with a different config" in err
    assert "beta: 10.0 → 3.0" in err and "learning_rate: 0.005 → 0.001" in err
    assert "Use a new output_dir" in err and "--overwrite_output_dir true" in err

    assert main(args + ["--beta", "3.0", "--overwrite_output_dir", "true"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x and "train_runtime" not in x] == [1, 2]  # only the new run
    assert yaml.safe_load((out / "prefopt_config.yaml").read_text())["beta"] == 3.0


def _nan_run(ws, tmp_path, monkeypatch, what: str):
    from prefopt.trainer import PreferenceTrainer

    original = PreferenceTrainer._step

    def poisoned(self, model, batch, split, counts, keep=None):
        loss = original(self, model, batch, split, counts, keep)
        if split == "train" and self.state.global_step == 2:
            if what == "loss":
                return loss * float("nan")
            weight = self.accelerator.unwrap_model(model).get_input_embeddings().weight
            zero = weight.sum() - weight.sum().detach()
            return loss + 0 * torch.sqrt(zero)  # the loss stays finite; d√x at 0 is inf, times 0: NaN
        return loss

    monkeypatch.setattr(PreferenceTrainer, "_step", poisoned)
    out = tmp_path / what
    cfg = build_config({**yaml.safe_load((ws / "config.yaml").read_text()), "output_dir": str(out),
                        "save_steps": 1, "save_total_limit": None})
    with pytest.raises(PrefoptError) as err:
        train(cfg, log=lambda *a: None)
    return out, str(err.value)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_stops_training_and_writes_no_final_model(ws, tmp_path, monkeypatch, what):
    out, message = _nan_run(ws, tmp_path, monkeypatch, what)
    assert f"step 3: the {what} is not finite (NaN or inf)" in message
    assert f"{ws / 'data'}[train] row" in message  # the rows of that step, by file, split and row
    assert "The last checkpoint in output_dir is intact" in message
    assert [p.name for p in checkpoints(out) if (p / COMPLETE).is_file()] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "model.safetensors").exists()
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_two_processes_killed_and_resumed_equal_one_uninterrupted(ws, uninterrupted, tmp_path):
    """DDP: each process holds part of the unlogged metric sums; the checkpoint keeps their total."""
    out = tmp_path / "ddp"
    killed = _train(ws, out, "step:5", 2)
    assert killed.returncode != 0
    again = _train(ws, out, None, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-4'}" in again.stdout
    # Another process count sums the eval metrics over ranks in another order, so not bit for bit
    # (although each rank runs one of the one-process run's micro-batches, and a sum of two terms
    # is the same in either order: measured identical here). Every line is logged after Adam
    # steps (the first at step 3): tolerances as test_distributed's, derived in tests/helpers.py.
    trajectory, weights = uninterrupted
    resumed = _trajectory(out)
    assert len(resumed) == len(trajectory)
    for a, b in zip(trajectory, resumed):
        assert a.keys() == b.keys()
        assert_logged_close(a, b, a.keys(), AFTER_ADAM_REL)
    assert_adam_weights_close(weights, load_file(out / "model.safetensors"), lr=5e-3, steps=8,
                              start=load_file(ws / "model" / "model.safetensors"))


def test_explicit_and_legacy_checkpoints_are_never_deleted_and_a_finished_run_adds_nothing(ws, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "legacy"
    shutil.copytree(ws / "uninterrupted", out)
    for path in checkpoints(out):
        (path / COMPLETE).unlink()  # as another tool (or an earlier version) would have left them
    before = _trajectory(out)
    again = _train(ws, out, None, 1, "--resume_from_checkpoint", str(out / "checkpoint-8"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removing" not in again.stdout and (out / "checkpoint-8").is_dir()
    after = _trajectory(out)
    assert after[:-1] == before[:-1]  # the finished run's lines, once each
    assert "train_loss" in after[-1] and "train_loss" not in after[-2]  # one summary, at the end


def test_overwrite_removes_what_the_previous_run_wrote(ws, tmp_path):
    """An adapter run, then a full-model run over it: the adapter's files (which the new run does
    not write again) go, the user's file stays."""
    out = tmp_path / "run"
    first = _train(ws, out, None, 1, "--use_peft", "true", "--max_steps", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    (out / "mine.txt").write_text("not prefopt's")
    done = _train(ws, out, None, 1, "--overwrite_output_dir", "true", "--max_steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert (out / "model.safetensors").is_file()
    assert (out / "mine.txt").read_text() == "not prefopt's"
