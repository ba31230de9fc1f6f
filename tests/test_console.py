"""The training console: a short fixed set of numbers per logged line, no bars in a log file, no
library warnings for features the run does not use, and metrics.jsonl still complete."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainerState

from helpers import free_port, tiny_random_model
from prefopt import console
from prefopt.trainer import ddp_find_unused

SPLITS = {"train": (16, 0), "test": (6, 1)}
RUN = dict(max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=2,
           per_device_eval_batch_size=3, report_to="none", save_strategy="no", seed=3)
TRAIN_NAMES = ["step", "epoch", "loss", "acc", "margin", "lr", "grad_norm"]  # + nll where the objective has one
LIBRARY_NOISE = ("Warning", "WARNING", "Setting accelerator", "Loading weights", "Loading checkpoint shards",
                 "find_unused_parameters")


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("console", SPLITS, **RUN).root


def names(line: str) -> list[str]:
    """The column names of a console line: `step 1/4  epoch 0.12  loss 1.3221 ...` → step, epoch, loss."""
    return [part.split(" ")[0] for part in line.split("  ")]


def numbers_only(line: str) -> bool:
    return all(re.fullmatch(r"[-+0-9.e/]+|nan", part.split(" ", 1)[1]) for part in line.split("  "))


# -- the lines ---------------------------------------------------------------------------------------

LOGGED = {"loss": 1.3221, "grad_norm": 2.969, "learning_rate": 1e-06, "lengths/chosen": 5.25, "logps/chosen": -5.653,
          "logits/chosen": 0.0017, "nll_loss": 0.0, "rewards/accuracies": 0.5, "rewards/chosen": -11.31,
          "rewards/margins": -0.01131, "rewards/rejected": -11.29, "epoch": 0.125}


def test_a_train_line_is_the_fixed_columns_as_numbers_and_nll_only_with_an_nll_term():
    simpo = console.log_line(LOGGED, 1, 4, nll=False)
    assert names(simpo) == TRAIN_NAMES and numbers_only(simpo) and "'" not in simpo
    assert simpo.startswith("step 1/4  epoch 0.12  loss 1.3221  acc 0.500  margin -0.01131  lr 1.00e-06")
    cpo = console.log_line({**LOGGED, "nll_loss": 5.5}, 1, 4, nll=True)
    assert names(cpo) == TRAIN_NAMES[:5] + ["nll"] + TRAIN_NAMES[5:] and "nll 5.5000" in cpo
    assert len(cpo) < 120  # one line on any terminal wider than 120 columns


def test_an_eval_line_is_short_and_the_final_totals_are_left_to_the_summary():
    logs = {"eval_" + k: v for k, v in LOGGED.items() if k not in ("epoch", "grad_norm", "learning_rate")}
    logs.update(eval_runtime=0.01, eval_samples_per_second=500.0)
    line = console.log_line(logs, 2, 4, nll=False)
    assert names(line) == ["eval", "loss", "acc", "margin"] and line.startswith("eval step 2/4  ")
    assert console.log_line({"train_runtime": 0.2, "train_loss": 1.3, "epoch": 0.5}, 4, 4, nll=False) is None


def test_plain_progress_every_five_percent_with_elapsed_and_eta():
    now = [0.0]
    lines = []
    progress = console.PlainProgress(nll=False, every_s=1e9, now=lambda: now[0],
                                     out=SimpleNamespace(write=lambda s: lines.append(s), flush=lambda: None))
    state = TrainerState(max_steps=200, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    for step in range(1, 201):
        state.global_step, now[0] = step, 1.55 * step
        progress.on_step_end(None, state, None)
    shown = [x for x in "".join(lines).splitlines() if x]
    assert [int(x.split()[1].split("/")[0]) for x in shown] == list(range(10, 201, 10))
    assert shown[3] == "step 40/200 (20%) elapsed 1:02 eta 4:08"  # 62 s for 40 steps: 248 s for 160 more
    assert shown[-1] == "step 200/200 (100%) elapsed 5:10 eta 0:00"


def test_plain_progress_also_prints_after_a_long_wait_between_its_steps():
    now, lines = [0.0], []
    progress = console.PlainProgress(nll=False, every_s=60, now=lambda: now[0],
                                     out=SimpleNamespace(write=lambda s: lines.append(s), flush=lambda: None))
    state = TrainerState(max_steps=1000, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    for step, t in ((1, 10.0), (2, 61.0), (3, 62.0)):
        state.global_step, now[0] = step, t
        progress.on_step_end(None, state, None)
    # 61 s for 2 steps: 30,439 s for 998 more
    assert [x for x in "".join(lines).splitlines() if x] == ["step 2/1000 (0%) elapsed 1:01 eta 8:27:19"]


# -- the libraries -----------------------------------------------------------------------------------

def test_deepspeeds_probe_is_told_the_cpu_only_where_deepspeed_is_not_used(monkeypatch):
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    for uses, device, told in ((False, "cpu", True), (True, "cpu", False), (False, "cuda", False)):
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        console.quiet_deepspeed(uses, device)
        assert (os.environ.get("DS_ACCELERATOR") == "cpu") is told, (uses, device)
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # the user's own setting stays
    console.quiet_deepspeed(False, "cpu")
    assert os.environ["DS_ACCELERATOR"] == "xpu"


def test_ddp_looks_for_unused_parameters_only_where_a_model_can_leave_some_out():
    from peft import LoraConfig, get_peft_model

    assert ddp_find_unused(tiny_random_model("llama"), activation_checkpointing=False) is False
    with console.peft_quietly():
        lora = get_peft_model(tiny_random_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert ddp_find_unused(lora, activation_checkpointing=False) is False
    assert ddp_find_unused(tiny_random_model("mixtral"), activation_checkpointing=False) is True  # unrouted experts
    assert ddp_find_unused(tiny_random_model("mixtral"), activation_checkpointing=True) is False  # as transformers


# -- whole runs ---------------------------------------------------------------------------------------

def _train(ws, out, launcher, *extra):
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = launcher + ["train", str(ws / "config.yaml"), "--output_dir", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ws)  # not a terminal
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _assert_quiet_file_output(done):
    text = done.stdout + done.stderr
    assert "\r" not in text  # no bar of any kind: tokenizing, loading, training, evaluating, writing
    for noise in LIBRARY_NOISE:
        assert noise not in text, noise


@pytest.mark.parametrize("method", ["simpo", "cpo"])
def test_a_run_into_a_file_prints_plain_short_lines_and_keeps_every_metric(ws, tmp_path, method):
    out = tmp_path / "out"
    done = _train(ws, out, [sys.executable, "-m", "prefopt"], "--method", method, "--use_peft", "true")
    _assert_quiet_file_output(done)
    lines = done.stdout.splitlines()
    train = [x for x in lines if re.match(r"step \d+/4  ", x)]
    evals = [x for x in lines if x.startswith("eval step ")]
    expected = TRAIN_NAMES[:5] + (["nll"] if method == "cpo" else []) + TRAIN_NAMES[5:]
    assert len(train) == 4 and all(names(x) == expected and numbers_only(x) for x in train)
    assert len(evals) == 2 and all(names(x) == ["eval", "loss", "acc", "margin"] + (["nll"] if method == "cpo" else [])
                                   for x in evals)
    assert [x for x in lines if re.match(r"step \d+/4 \(", x)][-1].startswith("step 4/4 (100%) elapsed ")
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "grad_norm", "learning_rate", "nll_loss", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen",
            "logits/rejected", "lengths/chosen", "lengths/rejected"}
    assert sum(keys <= line.keys() for line in logged) == 4  # every train line, every metric (nll_loss too)
    assert sum({"eval_" + k for k in keys - {"grad_norm", "learning_rate", "loss"}} | {"eval_loss"} <= line.keys()
               for line in logged) == 2
    assert any("train_runtime" in line for line in logged)
    if method == "simpo":  # merging the adapter: PEFT's wrapping is as quiet there
        env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
        merged = subprocess.run([sys.executable, "-m", "prefopt", "merge", str(out), "--output", str(tmp_path / "m")],
                                env=env, capture_output=True, text=True, timeout=600)
        assert merged.returncode == 0 and "Warning" not in merged.stdout + merged.stderr, merged.stderr[-2000:]
        # the commands that load models and train nothing are as quiet in a file: no bars, no DeepSpeed line
        (tmp_path / "prompts.txt").write_text("Sort: 3 1 2 =\nSort: 9 4 7 =\n")
        evaluated = subprocess.run([sys.executable, "-m", "prefopt", "eval", "--model", str(ws / "model"), "--model",
                                    str(tmp_path / "m"), "--data", str(ws / "data" / "test.jsonl"), "--prompts",
                                    str(tmp_path / "prompts.txt"), "--max_new_tokens", "4"],
                                   env=env, capture_output=True, text=True, timeout=600)
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        _assert_quiet_file_output(evaluated)
        assert "preference accuracy" in evaluated.stdout


def test_on_a_terminal_the_bar_stays_with_short_lines_above_it(ws, tmp_path, monkeypatch, capsys):
    import prefopt

    monkeypatch.setattr(console, "is_terminal", lambda stream=None: True)
    prefopt.train(prefopt.load_config(str(ws / "config.yaml"), output_dir=str(tmp_path / "out"), method="simpo"))
    captured = capsys.readouterr()
    assert "it/s]" in captured.err  # tqdm's training bar
    for bar in ("Loading weights", "Writing model shards"):  # tiny weights: done before a bar could show anything
        assert bar not in captured.err, bar
    train = [x for x in captured.out.splitlines() if re.match(r"step \d+/4  ", x)]
    assert len(train) == 4 and all(names(x) == TRAIN_NAMES and numbers_only(x) for x in train)
    assert "{'loss'" not in captured.out + captured.err


def test_two_processes_without_the_unused_parameters_search_or_its_warning(ws, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "prefopt"]
    done = _train(ws, tmp_path / "ddp", torchrun, "--method", "orpo", "--use_peft", "true",
                  "--diversity_weight", "0.1")  # DDP would stop at the second step if a parameter had no gradient
    _assert_quiet_file_output(done)
    assert "step 4/4 (100%)" in done.stdout
    asked = _train(ws, tmp_path / "asked", torchrun[:6] + [str(free_port())] + torchrun[7:],
                   "--method", "simpo", "--ddp_find_unused_parameters", "true")  # the user's own setting stands
    assert "find_unused_parameters=True was specified" in asked.stderr


def test_weights_are_small_only_where_the_folder_itself_holds_them(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert console.weights_bytes(str(tmp_path)) == 1000
    (tmp_path / "adapter_config.json").write_text("{}")  # an adapter: its base loads from elsewhere
    assert console.weights_bytes(str(tmp_path)) is None
    assert console.weights_bytes("org/some-hub-model") is None


def test_a_notebooks_display_is_left_to_the_trainer():
    from transformers.trainer_callback import CallbackHandler, TrainerCallback

    class Notebook(TrainerCallback):  # stands for transformers' NotebookProgressCallback
        pass

    trainer = SimpleNamespace(callback_handler=CallbackHandler([Notebook()], None, None, None, None),
                              args=SimpleNamespace(disable_tqdm=False))
    trainer.remove_callback, trainer.add_callback = trainer.callback_handler.remove_callback, \
        trainer.callback_handler.add_callback
    console.install(trainer, nll=False, terminal=False)
    assert [type(c) for c in trainer.callback_handler.callbacks] == [Notebook]
    trainer.callback_handler.add_callback(console.ProgressCallback)
    console.install(trainer, nll=False, terminal=False)
    assert [type(c) for c in trainer.callback_handler.callbacks] == [Notebook, console.PlainProgress]
