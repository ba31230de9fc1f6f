"""What a cluster and its users do to a run, done for real: signals (SIGTERM, SIGINT) to a running
process, two runs in one folder, a full or read-only file system (a small tmpfs mounted for the
test), damaged checkpoints, a finished run's command run again, a run shorter than its logging
interval, a run of the previous version resumed. In each case nothing of the user's is lost,
nothing wrong is trained without a word, and the message is one line naming the path and the fix —
never a traceback. The user's own files beside the run, the model trained from and the refusals to
resume are test_faults_files.py."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from faults_helpers import (
    ENV,
    WORKER,
    assert_same_run,
    fault_workspace,
    kill_after,
    ok,
    refused,
    run,
    snapshot,
    trajectory,
    wait_for_step,
)
from prefopt.checkpoints import COMPLETE, checkpoints


@pytest.fixture(scope="module")
def ws(workspace):
    return fault_workspace(workspace)


@pytest.fixture(scope="module")
def reference(ws):
    out = ws / "reference"
    ok(run(ws, out))
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint(ws, reference, tmp_path, sig, code):
    """SLURM's scancel/pre-emption (SIGTERM) and Ctrl-C (SIGINT): the step in progress finishes,
    a complete checkpoint is written there, one line says how to continue, and the same command
    then ends exactly where the uninterrupted run does. (save_steps 2 would save at even steps
    anyway: the signal is sent on an odd one, so the checkpoint is the signal's.)"""
    out = tmp_path / "run"
    proc = run(ws, out, fault="slow:0.3", wait=False)
    wait_for_step(out, proc, 3)
    sent = time.time()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    seconds = time.time() - sent
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert f"stopped by {sig.name} at step" in message and "is complete" in message
    step = int(message.split(" at step ")[1].split(":")[0])
    assert (out / f"checkpoint-{step}" / COMPLETE).is_file()
    assert seconds < 60, seconds  # a step of this tiny run and a checkpoint; generous for a loaded CI machine
    print(f"{sig.name}: {seconds:.2f} s from the signal to exit, checkpoint-{step} complete")
    again = ok(run(ws, out))
    assert f"resuming from {out / f'checkpoint-{step}'}" in again.stdout
    assert_same_run(reference, out)


def test_signal_while_tokenizing_and_during_the_final_save(ws, reference, tmp_path):
    out = tmp_path / "run"
    done = run(ws, out, fault="signal:INT:tokenizing")
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "stopped by SIGINT" in done.stderr.strip().splitlines()[-1]
    assert not out.exists() or not (out / "metrics.jsonl").exists()  # nothing was written yet
    done = run(ws, out, fault="signal:TERM:final_save")
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr[-3000:]
    ok(run(ws, out))  # finishes the save; no metrics line twice
    assert_same_run(reference, out)


def test_a_finished_runs_command_changes_nothing_and_a_larger_max_steps_continues(ws, reference, tmp_path):
    out = tmp_path / "run"
    ok(run(ws, out))
    before = snapshot(out)
    again = ok(run(ws, out))
    assert "is complete (8 steps)" in again.stdout and "larger max_steps" in again.stdout
    assert snapshot(out) == before  # not one file touched
    more = ok(run(ws, out, "--max_steps", "10"))
    assert "max_steps 8 → 10: continuing the run from" in more.stdout
    steps = [x["step"] for x in trajectory(out) if "loss" in x]
    assert steps == list(range(1, 11))  # the first 8 steps' lines kept once, then 9 and 10
    assert load_file(out / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()
    refused(run(ws, out, "--max_steps", "6"), "already at step 10", "larger max_steps")


def test_one_run_per_output_dir_at_a_time(ws, reference, tmp_path):
    out = tmp_path / "run"
    go = tmp_path / "go"
    first = run(ws, out, fault=f"hold:1:{go}", wait=False)  # holds at step 2 until `go` exists
    wait_for_step(out, first, 1)
    second = run(ws, out)
    refused(second, "is in use by another prefopt run (pid")
    go.write_text("")
    assert first.wait(timeout=600) == 0, first.communicate()
    assert_same_run(reference, out)  # the first run's lines, once each


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "state"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(ws, reference, tmp_path, damage):
    out = tmp_path / "run"
    kill_after(ws, out, 7)
    complete = [p for p in checkpoints(out) if (p / COMPLETE).is_file()]
    assert [p.name for p in complete] == ["checkpoint-4", "checkpoint-6"]
    latest = complete[-1]
    if damage == "zeroed":  # header intact, every weight 0: only a checksum tells
        weights = load_file(latest / "model.safetensors")
        save_file({k: torch.zeros_like(v) for k, v in weights.items()}, latest / "model.safetensors",
                  metadata={"format": "pt"})
    elif damage == "truncated":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (latest / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    again = ok(run(ws, out))
    assert f"{latest} cannot be resumed from" in again.stdout
    assert f"resuming from {out / 'checkpoint-4'}" in again.stdout
    assert (out / "checkpoint-6.set-aside").is_dir()  # moved aside, not deleted
    assert_same_run(reference, out)


def test_a_checkpoint_without_optimizer_state_falls_back_to_the_one_before(ws, reference, tmp_path):
    out = tmp_path / "run"
    kill_after(ws, out, 7)
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    again = ok(run(ws, out))
    assert f"{out / 'checkpoint-6'} cannot be resumed from: {out / 'checkpoint-6' / 'optimizer.pt'} is missing" in again.stdout
    assert f"resuming from {out / 'checkpoint-4'}" in again.stdout
    assert_same_run(reference, out)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of a few MB (tmpfs), so writes fail as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")  # CI and the developers' machines run as root
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_is_one_message_and_the_last_checkpoint_survives(ws, reference, small_disk):
    """3 MB hold two checkpoints of this model (weights 0.44 MB, optimizer 0.88 MB) but not a
    third beside them and the final model: since the disk check (disk.py), that is refused before
    step 1, in one message with the numbers; on a larger disk the same command trains the same run."""
    out = small_disk / "run"
    done = run(ws, out, "--save_total_limit", "3")
    stderr = refused(done, "will not fit", "GB free")
    errors = [line for line in stderr.splitlines() if line.startswith("prefopt: error")]
    assert len(errors) == 1, stderr
    assert not checkpoints(out)  # refused before step 1: nothing trained, nothing half-written
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    ok(run(ws, out, "--save_total_limit", "3"))
    assert_same_run(reference, out)


def test_file_system_mistakes_are_one_message(ws, tmp_path, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    refused(run(ws, small_disk / "run"), "Read-only file system", "writable disk")
    (tmp_path / "afile").write_text("")
    refused(run(ws, tmp_path / "afile"), "is a file, not a folder")
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    refused(run(ws, out), "metrics.jsonl")


def test_fewer_steps_than_logging_steps_still_succeeds(ws, tmp_path):
    """No train line is logged before the end: the run still succeeds (plots or not) and says so."""
    done = ok(run(ws, tmp_path / "run", "--max_steps", "2", "--logging_steps", "5", "--eval_strategy", "no"))
    assert "prefopt: done: 2 steps" in done.stdout
    assert "prefopt: plots of" in done.stdout or "prefopt: no plots" in done.stdout


def test_sigterm_to_torchrun_stops_every_process_at_the_same_step(ws, tmp_path):
    """torchrun forwards SIGTERM to its workers (and kills them 30 s later): both processes finish
    the step, agree on it, write one complete checkpoint there, and the same command continues."""
    from helpers import free_port

    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), WORKER]
    args = ["train", str(ws / "config.yaml"), "--output_dir", str(out), "--per_device_train_batch_size", "1"]
    proc = subprocess.Popen(launcher + args, env={**ENV, "PREFOPT_FAULT": "slow:0.3"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ws)
    wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = [line for line in stderr.splitlines() if line.startswith("prefopt: stopped by SIGTERM at step")]
    assert len(stopped) == 1, stderr[-3000:]  # rank 0 says it, once
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    assert (out / f"checkpoint-{step}" / COMPLETE).is_file()
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(free_port()), "-m", "prefopt", *args],
                           env=ENV, capture_output=True, text=True, timeout=600, cwd=ws)
    ok(again)
    assert f"resuming from {out / f'checkpoint-{step}'}" in again.stdout
    steps = [x["step"] for x in trajectory(out) if "loss" in x]
    assert steps == list(range(1, 9))


def test_a_signal_in_the_last_step_lets_the_run_finish(ws, reference, tmp_path):
    out = tmp_path / "run"
    done = ok(run(ws, out, fault="signal:TERM:step:8"))
    assert "prefopt: done: 8 steps" in done.stdout
    assert_same_run(reference, out)


def _as_written_by_the_previous_version(out: Path):
    """What prefopt wrote before manifests and checksums: marks {"step": N}, no prefopt_run.json,
    no lock, no writing marks."""
    (out / "prefopt_run.json").unlink()
    (out / ".prefopt.lock").unlink()
    for c in checkpoints(out):
        if (c / COMPLETE).is_file():
            (c / COMPLETE).write_text(json.dumps({"step": int(c.name.split("-")[1])}) + "\n")
        (c / "prefopt_checkpoint_writing").unlink(missing_ok=True)


def test_runs_of_the_previous_version_resume_and_stay_finished(ws, reference, tmp_path):
    finished = tmp_path / "finished"
    ok(run(ws, finished))
    _as_written_by_the_previous_version(finished)
    before = snapshot(finished)
    assert "is complete (8 steps)" in ok(run(ws, finished)).stdout
    after = snapshot(finished)
    assert after.pop(".prefopt.lock")[0] == b""  # the lock is the one file added (empty), once
    assert after == before
    # killed after checkpoint-6, with checkpoint-8 half-written (no mark, no state yet)
    out = tmp_path / "killed"
    kill_after(ws, out, 7)
    _as_written_by_the_previous_version(out)
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "model.safetensors").write_bytes(b"cut")
    again = ok(run(ws, out))
    assert f"removing {out / 'checkpoint-8'}" in again.stdout and f"resuming from {out / 'checkpoint-6'}" in again.stdout
    assert_same_run(reference, out)
