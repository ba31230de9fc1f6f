"""The on-policy protocol of benchmarks/onpolicy.py, end to end and small: the demo model, briefly
trained on the demo's fixed pairs, answers fresh sort prompts; `prefopt pairs` scores them with
prefopt.demo:sort_reward and min_chosen_score 1; training reads the pairs.

Whether such pairs beat the fixed ones is measured in benchmarks/onpolicy_results.md, not asserted
here: no setting measured there wins on every seed by more than the seed-to-seed spread.
"""

import json

import pytest

from prefopt.demo import DEMO_CONFIG, is_correct, make_rows, sort_reward, task_corpus

START_STEPS = 150  # enough for the demo model to sort some prompts right (no correct answer, no pair)


def test_sort_reward_is_one_for_a_correct_sort_and_graded_below_zero_otherwise():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sort: 3 1 2"}]
    assert sort_reward("Sort: 3 1 2 =", " 1 2 3", {}) == 1.0
    assert sort_reward(chat, "1 2 3", {}) == 1.0
    assert sort_reward("Sort: 3 1 2", "1 3 2", {}) == pytest.approx(-2 / 3)  # two substitutions of three
    assert sort_reward("Sort: 3 1 2", "1 2", {}) == pytest.approx(-1 / 3)  # one digit missing
    assert sort_reward("Sort: 3 1 2", "1 2 3 3 3 3", {}) == pytest.approx(-1.0)  # runaway: three extra
    assert sort_reward("Sort: 3 1 2", "", {}) == pytest.approx(-1.0)
    # a near miss scores above a runaway: rejected is the worst answer, not any wrong one
    assert sort_reward("Sort: 5 4", "4 4", {}) > sort_reward("Sort: 5 4", "4 5 5 5 5", {})


def test_onpolicy_pairs_from_the_demo_model_have_correct_chosen_answers_and_train(tmp_path):
    import prefopt
    from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    fixed_rows = make_rows(6000, seed=1, chat=True)
    (fixed / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed_rows))
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    base = save_tiny(tiny_model("llama", tok, seed=0), tok, tmp_path / "base")
    common = {**DEMO_CONFIG, "eval_strategy": "no", "eval_on_start": False, "report_to": "none"}
    prefopt.train({**common, "max_steps": START_STEPS, "model_name_or_path": str(base),
                   "output_dir": str(tmp_path / "start"), "datasets": [{"path": str(fixed)}]})

    prompts = [{"prompt": r["prompt"][0]["content"]} for r in make_rows(64, seed=7, chat=True)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    made = prefopt.pairs({"model_name_or_path": str(tmp_path / "start"),
                          "datasets": [{"path": str(tmp_path / "prompts.jsonl")}],
                          "reward_function": "prefopt.demo:sort_reward", "num_samples": 8, "temperature": 1.0,
                          "top_p": 1.0, "max_new_tokens": 16, "min_chosen_score": 1.0,
                          "generation_batch_size": 64, "output": str(tmp_path / "pairs.jsonl"), "seed": 3})
    rows = [json.loads(line) for line in made.output.read_text().splitlines()]
    answers = {a["index"]: a for a in map(json.loads, made.output.with_suffix(".answers.jsonl").read_text().splitlines())}
    report = made.report
    assert report["pairs"] == len(rows) > 0
    assert report["pairs"] + sum(report["dropped"].values()) == len(prompts)
    for r in rows:
        question, chosen, rejected = (x if isinstance(x, str) else x[-1]["content"]
                                      for x in (r["prompt"], r["chosen"], r["rejected"]))
        assert is_correct(question, chosen) and r["chosen_score"] == 1.0
        kept = answers[int(r["prompt_source"].rsplit(" ", 1)[1])]  # empty answers are never chosen or rejected
        lowest = min(s for a, s in zip(kept["answers"], kept["scores"]) if a.strip())
        assert not is_correct(question, rejected) and r["rejected_score"] == lowest < 0
    assert report["dropped"]["best_below_min"] > 0  # all-wrong prompts exist and are dropped, not paired

    run = prefopt.train({**common, "max_steps": 4, "learning_rate": 1e-3, "model_name_or_path": str(tmp_path / "start"),
                         "output_dir": str(tmp_path / "B1"), "datasets": [{"path": str(made.output)}]})
    assert run.train_metrics and (tmp_path / "B1" / "config.json").exists()
