"""`prefopt sweep`: reading the lists and stages, the guards and the choice (unit tests), and a 3×2
sweep of the demo task done for real — killed (SIGKILL) in its second trial, run again to the end
without training a finished trial twice, its choice the one a user would make from its table (the
demo at learning rate 3e-1 loses), its report redrawn, and a different sweep into the same folder
refused with nothing changed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from faults_helpers import ENV, ok, refused
from prefopt.checkpoints import COMPLETE
from prefopt.errors import PrefoptError
from prefopt.sweep import Options, _stages, plan_sweep, read_lists, trial_name
from prefopt.sweepjudge import _chosen_drop, _status, choose

LISTS = ["--learning_rate", "3e-3,3e-2,3e-1", "--gamma_beta_ratio", "0.3,0.8"]


# -- the command line -------------------------------------------------------------------------

def test_a_numeric_key_given_a_list_is_swept_and_the_rest_pass_through():
    lists, rest = read_lists(["--learning_rate", "1e-6,2e-6", "--beta=2.5", "--max_steps", "10", "--bf16"])
    assert lists == {"learning_rate": [1e-6, 2e-6]}
    assert rest == ["--beta=2.5", "--max_steps", "10", "--bf16"]
    lists, _ = read_lists(["--per_device_train_batch_size", "2,4"])
    assert lists == {"per_device_train_batch_size": [2, 4]} and all(type(v) is int for v in lists["per_device_train_batch_size"])


@pytest.mark.parametrize("args, words", [
    (["--method", "simpo,orpo"], ["--method", "only a numeric key"]),
    (["--beta", "2,two"], ["'two' is not a number"]),
    (["--beta", "2,2.0"], ["listed twice"]),
    (["--per_device_train_batch_size", "2,2.5"], ["'2.5' is not a whole number"]),
    (["--learning_rate", "1e-6,2e-6", "--learning_rate", "3e-6,4e-6"], ["swept twice"]),
    (["beta", "2,3"], ["expected --key value"]),
])
def test_bad_lists_name_the_argument(args, words):
    with pytest.raises(PrefoptError) as e:
        read_lists(args)
    for word in words:
        assert word in str(e.value)


def test_stages_name_each_swept_key_once():
    lists = {"learning_rate": [1.0, 2.0], "gamma_beta_ratio": [0.3, 0.5], "beta": [2.0, 2.5]}
    assert _stages(None, lists) == [list(lists)]
    assert _stages(["lr", "gamma_beta_ratio", "beta"], lists) == [["learning_rate"], ["gamma_beta_ratio"], ["beta"]]
    for names, words in ((["lr", "nll_weight"], "nll_weight, which has no list"),
                         (["lr", "beta"], "missing: gamma_beta_ratio"),
                         (["lr", "learning_rate", "gamma_beta_ratio", "beta"], "named twice")):
        with pytest.raises(PrefoptError, match=words):
            _stages(names, lists)


def test_a_trials_name_is_its_settings():
    assert trial_name({"learning_rate": 3e-7, "gamma_beta_ratio": 0.5, "per_device_train_batch_size": 4}) == \
        "learning_rate=3e-07,gamma_beta_ratio=0.5,per_device_train_batch_size=4"


# -- the guards and the choice ----------------------------------------------------------------

def record(name, status="ok", **metrics):
    return {"name": name, "status": status, "settings": {}, "metrics": metrics, "output_dir": name}


def test_the_choice_skips_guarded_trials_and_breaks_ties_by_accuracy_then_margin():
    acc, margin, loss = "eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"
    trials = [record("collapsed", "collapsed", **{acc: 0.99, margin: 9.0, loss: 0.1}),
              record("degenerate", "degenerate", **{acc: 0.99, margin: 9.0, loss: 0.1}),
              record("diverged", "diverged"),
              record("a", **{acc: 0.90, margin: 1.0, loss: 0.5}),
              record("b", **{acc: 0.90, margin: 2.0, loss: 0.6}),
              record("c", **{acc: 0.80, margin: 5.0, loss: 0.5})]
    assert choose(trials, "accuracy")["name"] == "b"  # a tie on accuracy: the larger margin
    assert choose(trials, "eval_loss")["name"] == "a"  # a tie on loss (a, c): the higher accuracy
    assert choose(trials[:3], "accuracy") is None


def test_the_guards():
    options = Options(max_chosen_logp_drop=1.0, max_repetition=0.5)
    assert _status({"chosen_logp_drop": 0.9, "repetition_rate": 0.5}, None, True, options) == ("ok", None)
    assert _status({"chosen_logp_drop": 1.2}, None, True, options)[0] == "collapsed"
    assert _status({"repetition_rate": 0.7}, None, True, options)[0] == "degenerate"
    assert _status({"eval_loss": float("nan")}, None, True, options)[0] == "diverged"
    assert _status({}, "step 3: the loss is not finite", True, options) == ("diverged", "step 3: the loss is not finite")
    assert _status({}, None, False, options)[0] == "diverged"
    # per token: the mean log-prob as logged (SimPO's length-normalised losses), or the sum over the length
    evals = [{"eval_logps/chosen": -2.0, "eval_lengths/chosen": 4.0}, {"eval_logps/chosen": -3.5, "eval_lengths/chosen": 5.0}]
    assert _chosen_drop(evals, per_token=True) == pytest.approx(1.5)
    assert _chosen_drop(evals, per_token=False) == pytest.approx(-2.0 / 4 + 3.5 / 5)
    assert _chosen_drop(evals[:1], per_token=True) is None


# -- the demo task, swept for real ------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from prefopt.demo import DEMO_CONFIG, write_task

    root = tmp_path_factory.mktemp("sweep")
    keys, _, _ = write_task(root / "task", log=lambda *a: None)
    config = {**DEMO_CONFIG, **keys, "max_steps": 60, "eval_steps": 30, "save_strategy": "steps", "save_steps": 30,
              "logging_steps": 10, "output_dir": str(root / "sweep")}
    (root / "sweep.yaml").write_text(yaml.safe_dump(config))
    return root


def sweep(task, *args, **kwargs):
    return [sys.executable, "-m", "prefopt", "sweep", *([str(task / "sweep.yaml")] if "--report" not in args else []),
            *args]


def finished(trial: Path) -> bool:
    manifest = trial / "prefopt_run.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("finished"))


def kill_in_the_second_trial(proc, trials: Path, timeout=600):
    """SIGKILL once one trial has finished and another has written its first checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        folders = sorted(trials.glob("*")) if trials.is_dir() else []
        done = [f for f in folders if finished(f)]
        started = [f for f in folders if not finished(f) and (f / "checkpoint-30" / COMPLETE).is_file()]
        if done and started:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return done, started
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the sweep did not reach its second trial's first checkpoint")


def test_a_3x2_sweep_resumes_after_a_kill_and_chooses_what_its_table_shows(task):
    root, trials = task / "sweep", task / "sweep" / "trials"
    proc = subprocess.Popen(sweep(task, *LISTS), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done, started = kill_in_the_second_trial(proc, trials)
    kept = {f.name: ((f / "metrics.jsonl").read_bytes(), (f / "model.safetensors").stat().st_mtime_ns) for f in done}

    again = ok(subprocess.run(sweep(task, *LISTS), env=ENV, capture_output=True, text=True, timeout=1200))
    trained = [line for line in again.stdout.splitlines() if line.startswith("prefopt sweep: stage 1, trial ")]
    assert not any(name in line for line in trained for name in kept), trained  # finished trials: not again
    assert len(trained) == 6 - len(done)
    assert f"resuming from {started[0] / 'checkpoint-30'}" in again.stdout + again.stderr
    for name, (metrics, mtime) in kept.items():
        assert (trials / name / "metrics.jsonl").read_bytes() == metrics
        assert (trials / name / "model.safetensors").stat().st_mtime_ns == mtime
    steps = [x["step"] for x in map(json.loads, (started[0] / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert steps == [10, 20, 30, 40, 50, 60]  # resumed once, at 30: no step logged twice

    summary = json.loads((root / "sweep.json").read_text())
    assert len(summary["trials"]) == 6 and {t["output_dir"] for t in summary["trials"]} == {str(f) for f in trials.glob("*")}
    for t in summary["trials"]:
        assert set(t) >= {"settings", "metrics", "output_dir", "status"} and "eval_rewards/accuracies" in t["metrics"]
    fine = [t for t in summary["trials"] if t["status"] == "ok"]
    by_table = max(fine, key=lambda t: (t["metrics"]["eval_rewards/accuracies"], t["metrics"]["eval_rewards/margins"]))
    assert summary["best"]["settings"] == by_table["settings"]
    assert summary["best"]["settings"]["learning_rate"] != 0.3  # the demo at 3e-1 must lose
    worst = [t for t in summary["trials"] if t["settings"]["learning_rate"] == 0.3]
    assert all(t["metrics"]["eval_rewards/accuracies"] < by_table["metrics"]["eval_rewards/accuracies"] for t in worst)
    assert f"chosen by accuracy: {summary['best']['trial']}" in again.stdout
    assert summary["best"]["trial"] in (root / "sweep.md").read_text()

    pictures = {p.name for p in (root / "plots").glob("*.png")}
    assert pictures == {"sweep_learning_rate.png", "sweep_gamma_beta_ratio.png", "sweep_curves.png"}
    for p in (root / "plots").glob("*.png"):
        p.unlink()
    redrawn = ok(subprocess.run(sweep(task, "--report", str(root)), env=ENV, capture_output=True, text=True, timeout=300))
    assert {p.name for p in (root / "plots").glob("*.png")} == pictures and summary["best"]["trial"] in redrawn.stdout

    before = {p: p.read_bytes() for p in (root / "sweep.json", root / "sweep.journal")}
    other = subprocess.run(sweep(task, "--learning_rate", "3e-3,3e-2", "--gamma_beta_ratio", "0.3,0.8"),
                           env=ENV, capture_output=True, text=True, timeout=300)
    refused(other, "holds another sweep", "--learning_rate", "another output_dir")
    assert {p: p.read_bytes() for p in before} == before

    # another metric judges the same trials again, without training: a reward model's win rate over
    # the base model's answers to --prompts
    from prefopt.demo import make_rows
    from prefopt.tiny import train_reward_model

    train_reward_model(make_rows(800, 5, chat=True), task / "rm", steps=150)
    prompts = task / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(x)["prompt"]}) + "\n"
                               for x in (task / "task" / "data" / "test.jsonl").read_text().splitlines()[:16]))
    judged = ok(subprocess.run(sweep(task, *LISTS, "--metric", "win_rate", "--reward_model", str(task / "rm"),
                                     "--prompts", str(prompts)), env=ENV, capture_output=True, text=True, timeout=600))
    assert "stage 1, trial" not in judged.stdout
    summary = json.loads((root / "sweep.json").read_text())
    assert summary["metric"] == "win_rate" and all(0 <= t["metrics"]["win_rate"] <= 1 for t in summary["trials"])
    fine = [t for t in summary["trials"] if t["status"] == "ok"]
    assert summary["best"]["metrics"]["win_rate"] == max(t["metrics"]["win_rate"] for t in fine)
    assert (root / "base_answers.json").is_file() and len(list((root / "answers").glob("*.json"))) == 6


def test_refusals_before_anything_trains(task, tmp_path):
    config = str(task / "sweep.yaml")
    for args, options, words in ((["--learning_rate", "1e-3"], Options(), "nothing to sweep"),
                                 (["--gamma", "0.5,0.6"], Options(), "keep one of them"),
                                 (LISTS, Options(metric="win_rate"), "give --reward_model DIR and --prompts FILE"),
                                 (LISTS, Options(metric="kl"), "choose one of accuracy, eval_loss"),
                                 (LISTS, Options(stages=["lr"]), "missing: gamma_beta_ratio"),
                                 (LISTS + ["--beta", "-1"], Options(), "beta")):
        with pytest.raises(PrefoptError, match=words):
            plan_sweep(config, args, options)
    run = tmp_path / "run"
    run.mkdir()
    (run / "prefopt_run.json").write_text("{}")
    with pytest.raises(PrefoptError, match="holds a training run"):
        plan_sweep(config, LISTS + ["--output_dir", str(run)], Options())
    with pytest.raises(PrefoptError, match="learning_rate"):  # every trial's value is checked up front
        plan_sweep(config, ["--learning_rate", "3e-3,-1"], Options())


def test_two_processes_share_one_grid(task, tmp_path):
    """One `prefopt sweep` per GPU on one output_dir: each trial is trained by one of them, once,
    and both report the same choice."""
    args = sweep(task, "--learning_rate", "3e-3,3e-2", "--gamma_beta_ratio", "0.3,0.8", "--output_dir",
                 str(tmp_path / "shared"), "--max_steps", "20", "--eval_steps", "20", "--save_strategy", "no")
    procs = [subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-1500:] + err[-3000:]
    trained = [line.split(" trial ")[1] for out, _ in outs for line in out.splitlines()
               if line.startswith("prefopt sweep: stage 1, trial ")]
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 4
    chosen = {line for out, _ in outs for line in out.splitlines() if line.startswith("prefopt sweep: chosen by")}
    assert len(chosen) == 1


def test_a_diverged_trial_stays_diverged_when_the_sweep_runs_again(task, tmp_path, monkeypatch):
    """A non-finite step marks its trial diverged and the sweep goes on; a rerun (which judges the
    trial from its folder, where the evaluation before training looks fine) still marks it."""
    from prefopt.sweep import run_sweep
    from prefopt.trainer import PreferenceTrainer

    original = PreferenceTrainer._step

    def poisoned(self, model, batch, split, counts, keep=None):
        loss = original(self, model, batch, split, counts, keep)
        bad = split == "train" and self.args.learning_rate == 3e-2 and self.state.global_step == 2
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(PreferenceTrainer, "_step", poisoned)
    args = ["--learning_rate", "3e-3,3e-2", "--output_dir", str(tmp_path / "nan"), "--max_steps", "10",
            "--eval_steps", "10", "--save_strategy", "no"]
    for _ in range(2):
        summary = run_sweep(plan_sweep(str(task / "sweep.yaml"), args, Options()), log=lambda *a: None)
        status = {t["settings"]["learning_rate"]: (t["status"], t["reason"]) for t in summary["trials"]}
        assert status[3e-2][0] == "diverged" and "step 3: the loss is not finite" in status[3e-2][1], status
        assert status[3e-3] == ("ok", None) and summary["best"]["settings"]["learning_rate"] == 3e-3
