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
