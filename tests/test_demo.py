"""The demo keeps its promise: held-out preference accuracy from about chance to at least 0.9.

A shortened run (the full demo trains longer); the numbers are the ones the demo prints.
"""

from prefopt.demo import run_demo


def test_demo_learns_the_preference(tmp_path):
    lines = []
    numbers = run_demo(tmp_path / "demo", log=lines.append, max_steps=400, eval_steps=200)
    assert 0.3 <= numbers["preference_accuracy_before"] <= 0.7  # a random model: about chance
    assert numbers["preference_accuracy_after"] >= 0.9
    assert numbers["greedy_correct_before"] == 0.0
    assert numbers["greedy_correct_after"] > numbers["greedy_correct_before"]
    text = "\n".join(lines)
    assert "preference accuracy" in text and "metrics.jsonl" in text
    assert (tmp_path / "demo" / "model" / "metrics.jsonl").is_file()
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
    assert "next, with " in text and "generate --model" in text  # how to go on, with a command that runs


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path):
    import pytest

    from prefopt.demo import DEMO_MARK, _clear_previous_demo
    from prefopt.errors import PrefoptError

    mine = tmp_path / "demo_output"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(PrefoptError, match="was not written by the demo"):
        run_demo(mine, log=lambda *_: None)
    assert (mine / "thesis.tex").read_text() == "years of work"

    (mine / "thesis.tex").unlink()
    (mine / DEMO_MARK).write_text("")  # an earlier demo's folder is replaced
    (mine / "model").mkdir()
    _clear_previous_demo(mine)
    assert not mine.exists()


def test_next_steps_name_a_command_that_exists(tmp_path, monkeypatch):
    import shutil
    import sys
    from pathlib import Path

    from prefopt import demo

    monkeypatch.setattr(shutil, "which", lambda name: None)
    command = demo._command()
    assert command.endswith("prefopt")
    assert command == f"{Path(sys.executable).name} -m prefopt" or Path(command).exists()
