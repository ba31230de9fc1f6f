"""What a run does with the files around it, done for real: only what the run wrote is deleted or
rotated, the user's files beside the run survive, the model trained from is never the output, a
damaged model folder is refused before loading; a resume on changed data or from a checkpoint that
cannot be resumed is refused naming it, and nothing changes; `resume_from_checkpoint: true` (the
HF spelling) resumes, and every sharding backend's optimizer state counts. Each message is one
line naming the path and the fix — never a traceback."""

import json
import subprocess
import sys

import pytest
import yaml

from faults_helpers import ENV, fault_workspace, kill_after, ok, refused, run, snapshot
from prefopt.checkpoints import checkpoints


@pytest.fixture(scope="module")
def ws(workspace):
    return fault_workspace(workspace)


def test_only_what_the_run_wrote_is_deleted_or_rotated(ws, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-2-keep").mkdir()
    (out / "checkpoint-2-keep" / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    ok(run(ws, out))
    assert [p.name for p in checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]  # save_total_limit 2
    assert (out / "checkpoint-2-keep" / "notes.txt").read_text() == "mine"
    ok(run(ws, out, "--overwrite_output_dir", "true", "--max_steps", "2"))
    assert (out / "notes.txt").read_text() == "mine too" and (out / "checkpoint-2-keep").is_dir()
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    # a file of the user's where the run would write its own is refused, not overwritten
    (out / "README.md").write_text("my notes")
    refused(run(ws, out, "--overwrite_output_dir", "true"), "README.md", "did not write")
    assert (out / "README.md").read_text() == "my notes"


def test_the_model_trained_from_is_never_the_output(ws, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    before = snapshot(model)
    refused(run(ws, model, "--model_name_or_path", str(model), "--overwrite_output_dir", "true"),
            "is the model being trained from")
    assert snapshot(model) == before


def test_resume_on_changed_data_is_refused_and_nothing_changes(ws, tmp_path):
    out = tmp_path / "run"
    ok(run(ws, out, "--max_steps", "4"))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (data / name).write_text((ws / "data" / name).read_text())
    edited = dict(yaml.safe_load((ws / "config.yaml").read_text()), dataset_mixer={str(data): 1.0})
    # a run killed after checkpoint-2: the finished mark is taken off by hand
    manifest = json.loads((out / "prefopt_run.json").read_text())
    manifest["finished"] = None
    (out / "prefopt_run.json").write_text(json.dumps(manifest))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(edited))
    # same data at a new path: the config differs (that is refused by the config check)
    before = snapshot(out)
    done = subprocess.run([sys.executable, "-m", "prefopt", "train", str(tmp_path / "c.yaml"), "--output_dir",
                           str(out), "--max_steps", "4"], env=ENV, capture_output=True, text=True, timeout=600)
    refused(done, "different config")
    assert snapshot(out) == before
    # the same file, edited
    rows = (ws / "data" / "train.jsonl").read_text().splitlines()
    original = (ws / "data" / "train.jsonl").read_text()
    try:
        (ws / "data" / "train.jsonl").write_text("\n".join(rows[:-1] + [rows[0]]) + "\n")
        refused(run(ws, out, "--max_steps", "4"), "the data changed since", "train.jsonl changed")
        assert snapshot(out) == before
        (ws / "data" / "train.jsonl").write_text('{"prompt": 1}\n')  # no longer valid
        refused(run(ws, out, "--max_steps", "4"))
        assert snapshot(out) == before
    finally:
        (ws / "data" / "train.jsonl").write_text(original)


def test_resume_from_checkpoint_true_is_the_hf_spelling(ws, tmp_path):
    out = tmp_path / "run"
    kill_after(ws, out, 5)
    again = ok(run(ws, out, "--resume_from_checkpoint", "true"))
    assert f"resuming from {out / 'checkpoint-4'}" in again.stdout


def test_a_damaged_model_folder_is_refused_before_loading(ws, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:-1000])
    refused(run(ws, tmp_path / "a", "--model_name_or_path", str(model)), "model.safetensors: it is cut short",
            "Copy or download it again")
    (model / "model.safetensors").write_bytes(data)
    for p in model.glob("tokenizer*"):
        p.unlink()
    refused(run(ws, tmp_path / "b", "--model_name_or_path", str(model)), "holds no tokenizer files",
            "tokenizer_name_or_path")

def test_the_users_files_added_between_starts_survive_an_overwrite(ws, tmp_path):
    out = tmp_path / "run"
    ok(run(ws, out, "--max_steps", "2"))
    (out / "notes.txt").write_text("written after the first start")
    ok(run(ws, out, "--max_steps", "4"))  # continues
    (out / "eval.json").write_text("{}")  # e.g. prefopt eval --output, after the run
    ok(run(ws, out, "--overwrite_output_dir", "true", "--max_steps", "2"))
    assert (out / "notes.txt").is_file() and (out / "eval.json").is_file()


def test_resume_refusals_name_the_checkpoint(ws, tmp_path):
    out = tmp_path / "run"
    kill_after(ws, out, 5)
    (out / "checkpoint-6").mkdir(exist_ok=True)
    (out / "checkpoint-6" / "prefopt_checkpoint_writing").write_text("")
    (out / "checkpoint-6" / "trainer_state.json").write_text((out / "checkpoint-4" / "trainer_state.json").read_text())
    before = snapshot(out)
    refused(run(ws, out, "--resume_from_checkpoint", str(out / "checkpoint-6")), "was cut short while being written")
    manifest = json.loads((out / "prefopt_run.json").read_text())
    (out / "prefopt_run.json").write_text(json.dumps({**manifest, "processes": 2}))
    refused(run(ws, out), "was trained on 2 processes and this start has 1", "as many processes as before")
    (out / "prefopt_run.json").write_text(json.dumps(manifest))
    assert snapshot(out) == {**before, "prefopt_run.json": snapshot(out)["prefopt_run.json"]}
    aside = out / "checkpoint-8.set-aside"
    import shutil

    shutil.copytree(ws / "model", aside)
    refused(run(ws, out, "--model_name_or_path", str(aside), "--overwrite_output_dir", "true"),
            "is a checkpoint inside output_dir")
    assert (aside / "model.safetensors").is_file()


def test_every_sharding_backends_optimizer_state_counts(tmp_path):
    from prefopt.checkpoints import has_optimizer_state

    for name, folder in (("optimizer.pt", False), ("optimizer.bin", False), ("optimizer_0", True),
                         ("optimizer_0_rank0.bin", False), ("global_step4", True)):
        c = tmp_path / name / "checkpoint-4"
        c.mkdir(parents=True)
        (c / name).mkdir() if folder else (c / name).write_bytes(b"x")
        assert has_optimizer_state(c), name
    (tmp_path / "none").mkdir()
    assert not has_optimizer_state(tmp_path / "none")
