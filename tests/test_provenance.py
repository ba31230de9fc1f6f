"""The reproducibility record (prefopt.provenance): output_dir/prefopt_provenance.json holds the
package versions, prefopt's version and git commit (from a checkout only), the tokenizer's and the
chat template's hashes and the seed; the card shows it; a resume under other packages warns naming
each one and both versions, and still trains."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from prefopt import manifest, provenance
from prefopt.config import build_config
from prefopt.pipeline import train

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("provenance", {"train": (8, 0), "test": (4, 1)}, chat=True, method="simpo",
                     learning_rate=5e-3, seed=11, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     save_steps=2, report_to="none")


def _run(ws, out, **keys):
    said = []
    result = train(build_config({**ws.config, "output_dir": str(out), **keys}), log=said.append)
    return result, said


def test_the_record_of_a_run(ws, tmp_path):
    out = tmp_path / "run"
    result, _ = _run(ws, out)
    record = json.loads((out / provenance.PROVENANCE_FILE).read_text())
    assert record["packages"]["torch"] == torch.__version__
    assert record["packages"]["transformers"] == transformers.__version__
    assert {"accelerate", "peft", "datasets"} <= set(record["packages"])
    assert "deepspeed" not in record["packages"]  # not used by this run
    assert record["seed"] == 11 and record["earlier"] == []
    tokenizer = result.trainer.processing_class
    assert record["tokenizer"] == provenance.tokenizer_hash(tokenizer)
    assert record["chat_template"] == provenance.chat_template_hash(tokenizer)
    # this test runs prefopt from its checkout: the commit is the checkout's
    head = subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["prefopt"]["version"] and record["prefopt"]["commit"] == head
    # shown in the card; the run's own file
    card = (out / "README.md").read_text()
    assert f"torch {torch.__version__}" in card and f"commit {head}" in card and record["tokenizer"] in card
    assert provenance.PROVENANCE_FILE in manifest.read_manifest(out)["files"]


def test_the_hashes_follow_the_tokenizer_and_its_template(ws):
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(ws.model) for _ in range(2))
    assert provenance.tokenizer_hash(a) == provenance.tokenizer_hash(b)
    assert provenance.chat_template_hash(a) == provenance.chat_template_hash(b) is not None
    b.add_tokens(["<extra>"])
    assert provenance.tokenizer_hash(a) != provenance.tokenizer_hash(b)
    b.chat_template = a.chat_template + " "
    assert provenance.chat_template_hash(a) != provenance.chat_template_hash(b)
    b.chat_template = None
    assert provenance.chat_template_hash(b) is None


def test_no_commit_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    # a copy of the package outside any git repository (as a wheel installs it)
    shutil.copytree(SRC / "prefopt", tmp_path / "prefopt", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import json; from prefopt.provenance import prefopt_source; print(json.dumps(prefopt_source()))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["commit"] is None and found["version"]
    # no git at all: no commit, no failure
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert provenance.prefopt_source()["commit"] is None


def test_differences_name_each_package_and_both_versions():
    old = {"packages": {"torch": "2.12.0", "peft": "0.21.2", "deepspeed": "0.19.8"}, "python": "3.10.4",
           "prefopt": {"version": "0.1.0", "commit": "a" * 40}}
    new = {"packages": {"torch": "2.13.0", "peft": "0.21.2"}, "python": "3.11.7",
           "prefopt": {"version": "0.1.0", "commit": "b" * 40}}
    # a package recorded by one start only (deepspeed is recorded when used) is not compared
    assert provenance.differences(old, new) == ["torch 2.12.0 → 2.13.0", "Python 3.10.4 → 3.11.7",
                                                f"prefopt commit {'a' * 12} → {'b' * 12}"]
    assert provenance.differences(old, {**new, "prefopt": {"version": "0.2.0"}})[-1] == "prefopt 0.1.0 → 0.2.0"
    assert provenance.differences(new, new) == []


def test_a_resume_under_other_packages_warns_naming_them(ws, tmp_path):
    out = tmp_path / "run"
    _run(ws, out)
    path = out / provenance.PROVENANCE_FILE
    record = json.loads(path.read_text())
    record["packages"].update(torch="2.0.0-fake", peft="0.1.0-fake")
    path.write_text(json.dumps(record))
    result, said = _run(ws, out, max_steps=3)  # continues from checkpoint-2
    assert result.trainer.state.global_step == 3
    assert any("resuming from" in line for line in said)
    (warning,) = [line for line in said if "other packages" in line]
    assert f"peft 0.1.0-fake → {provenance.package_versions()['peft']}" in warning
    assert f"torch 2.0.0-fake → {torch.__version__}" in warning
    assert "transformers" not in warning  # the same as before: not named
    # the record is this start's; the one it continued is kept; the card says so
    now = json.loads(path.read_text())
    assert now["packages"]["torch"] == torch.__version__ and now["earlier"][0]["packages"]["torch"] == "2.0.0-fake"
    card = (out / "README.md").read_text()
    assert "resumed from a start under other packages: peft 0.1.0-fake → " in card
    # a resume under the same packages says nothing
    _, said = _run(ws, out, max_steps=4)
    assert not [line for line in said if "other packages" in line]
