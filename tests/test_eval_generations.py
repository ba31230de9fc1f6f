"""generate_during_eval: the generations table at each evaluation (prefopt.evalgen) — written to
output_dir/eval_generations.jsonl and to TensorBoard, the same prompts every time, answers within
their budget, appended on a resume, refused without evaluation data; and a run with the table
trains exactly as one without it."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from config_helpers import refused
from helpers import free_port
from prefopt import evalgen, manifest, values
from prefopt.config import build_config
from prefopt.errors import PrefoptError
from prefopt.pipeline import train

# values that depend on wall-clock time, not on the computation
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second", "total_flos"}
N, BUDGET = 3, 5


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("evalgen", {"train": (16, 0), "test": (6, 1)}, chat=True, method="simpo",
                     learning_rate=5e-3, seed=3, max_steps=4, per_device_train_batch_size=4,
                     per_device_eval_batch_size=2, logging_steps=1, eval_strategy="steps", eval_steps=2,
                     save_strategy="steps", save_steps=2, report_to="none")


def _run(ws, out, **keys):
    return train(build_config({**ws.config, "output_dir": str(out), **keys}), log=lambda *a: None)


def _rows(out):
    return [json.loads(x) for x in (out / evalgen.GENERATIONS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def with_table(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalgen-runs") / "with"
    result = _run(ws, out, generate_during_eval=True, eval_generation_prompts=N,
                  eval_generation_max_new_tokens=BUDGET, report_to="tensorboard")
    return out, result


def test_a_table_at_each_evaluation(ws, with_table):
    out, result = with_table
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2] * N + [4] * N  # every eval_steps; the final one is not repeated
    first, last = rows[:N], rows[N:]
    assert [r["prompt"] for r in first] == [r["prompt"] for r in last]  # the same prompts every time
    assert len({r["prompt"] for r in first}) == N
    # they are the evaluation split's first prompts as rendered (the chat template applied)
    tok = result.trainer.processing_class
    eval_ids = result.trainer.eval_dataset["prompt_ids"]
    assert [r["prompt"] for r in first] == [tok.decode(ids) for ids in eval_ids[:N]]
    assert all("<|im_start|>assistant" in r["prompt"] for r in first)
    chosen = result.trainer.eval_dataset["chosen_ids"][:N]
    assert [r["chosen"] for r in first] == [tok.decode(ids, skip_special_tokens=True).strip() for ids in chosen]
    for r in rows:
        assert 1 <= r["completion_tokens"] <= BUDGET
        assert r["ended"] or r["completion_tokens"] == BUDGET  # cut only at the budget
    # the same table in TensorBoard, at each evaluation's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in out.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Tensors("eval/generations/text_summary")] == [2, 4]


def test_answers_are_reproducible_and_the_mode_is_put_back(with_table):
    """Greedy: the final model answers the prompts as the last evaluation (at the final step)
    recorded; generating leaves a model in training mode in training mode."""
    out, result = with_table
    (table,) = [cb for cb in result.trainer.callback_handler.callbacks if isinstance(cb, evalgen.EvalGenerations)]
    model = result.trainer.model.train()
    answers = table.answers(synced=False)
    assert model.training
    tok = result.trainer.processing_class
    assert [tok.decode(a, skip_special_tokens=True).strip() for a in answers] == [r["completion"]
                                                                                  for r in _rows(out)[N:]]


def test_the_file_is_the_runs_own(ws, with_table, tmp_path):
    """Recorded in the manifest (overwrite_output_dir deletes it); a user's file of that name in a
    new output_dir is refused, not overwritten."""
    out, _ = with_table
    assert out / evalgen.GENERATIONS_FILE in manifest.owned(out, manifest.read_manifest(out))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / evalgen.GENERATIONS_FILE).write_text("mine\n")
    with pytest.raises(PrefoptError, match=evalgen.GENERATIONS_FILE):
        _run(ws, theirs, generate_during_eval=True)
    assert (theirs / evalgen.GENERATIONS_FILE).read_text() == "mine\n"


def test_a_run_stopped_before_its_first_checkpoint_starts_again(ws, tmp_path, monkeypatch):
    """The file is the run's from its start, not only once a checkpoint records it: a run stopped
    after its first evaluation wrote the file, before any checkpoint, is started again (afresh)."""
    from prefopt.trainer import PreferenceTrainer

    out, keys = tmp_path / "out", dict(generate_during_eval=True, eval_generation_prompts=2,
                                       eval_generation_max_new_tokens=2)

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt("stopped before checkpoint-2")

    with monkeypatch.context() as m:
        m.setattr(PreferenceTrainer, "_save_checkpoint", stop)
        with pytest.raises(KeyboardInterrupt):
            _run(ws, out, **keys)
    assert [r["step"] for r in _rows(out)] == [2, 2]
    _run(ws, out, **keys)
    assert [r["step"] for r in _rows(out)] == [2, 2, 4, 4]


def test_lora(ws, tmp_path):
    out = tmp_path / "out"
    _run(ws, out, max_steps=2, use_peft=True, lora_target_modules=["q_proj", "v_proj"], generate_during_eval=True,
         eval_generation_prompts=2, eval_generation_max_new_tokens=3)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 2] and all(1 <= r["completion_tokens"] <= 3 for r in rows)
    assert (out / "adapter_model.safetensors").is_file()


def test_the_table_changes_no_training_number(ws, with_table, tmp_path):
    """Greedy decoding draws from no random stream and the model's mode is put back: the run
    without the table logs the same numbers and ends with the same weights, bit for bit (one
    process, one thread, the same micro-batches in the same order)."""
    out, _ = with_table
    plain = tmp_path / "plain"
    _run(ws, plain)
    assert not (plain / evalgen.GENERATIONS_FILE).exists()

    def trajectory(d):
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
                for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert trajectory(out) == trajectory(plain)
    a, b = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    assert a.keys() == b.keys() and [n for n in a if not torch.equal(a[n], b[n])] == []


def test_resume_appends_and_drops_lines_after_the_checkpoint(ws, tmp_path):
    out = tmp_path / "out"
    keys = dict(generate_during_eval=True, eval_generation_prompts=2, eval_generation_max_new_tokens=3)
    _run(ws, out, **keys)
    before = _rows(out)
    assert [r["step"] for r in before] == [2, 2, 4, 4]
    # a later line of a run that went further than its last checkpoint, and a line cut short by a kill
    with (out / evalgen.GENERATIONS_FILE).open("a") as fh:
        fh.write(json.dumps({**before[-1], "step": 5}) + "\n" + '{"step": 6, "pro')
    _run(ws, out, max_steps=6, **keys)  # continues from checkpoint-4
    after = _rows(out)
    assert after[:4] == before
    assert [r["step"] for r in after] == [2, 2, 4, 4, 6, 6]
    assert after[4]["prompt"] == before[0]["prompt"]


def test_a_resume_may_turn_the_table_on(ws, tmp_path):
    """The keys are not part of the run's identity: a run continued with the table has it from the
    step it continued at."""
    out = tmp_path / "out"
    _run(ws, out)
    _run(ws, out, max_steps=6, generate_during_eval=True, eval_generation_prompts=2, eval_generation_max_new_tokens=2)
    assert [r["step"] for r in _rows(out)] == [6, 6]


def test_no_table_without_evaluation_data(tmp_path, capsys):
    err = refused(tmp_path, capsys, "method: simpo\ndatasets:\n  - path: x.jsonl\n", "--generate_during_eval", "true")
    assert err.startswith("c.yaml: generate_during_eval: true generates answers to held-out prompts")
    assert "set generate_during_eval: false" in err
    # with held-out rows it is accepted
    cfg = build_config({"method": "simpo", "datasets": [{"path": "x.jsonl"}], "test_split_size": 0.1,
                        "generate_during_eval": True})
    evalgen.check(cfg, "c.yaml")
    assert cfg.run.generate_during_eval and cfg.run.eval_generation_prompts == 4


@pytest.mark.parametrize("key, value, message", [
    ("eval_generation_prompts", "0", "eval_generation_prompts must be at least 1"),
    ("eval_generation_max_new_tokens", "0", "eval_generation_max_new_tokens must be at least 1"),
    ("eval_generation_prompts", "1.5", "eval_generation_prompts: expected a whole number"),
])
def test_counts_are_checked(tmp_path, capsys, key, value, message):
    err = refused(tmp_path, capsys, "method: simpo\n", f"--{key}", value)
    assert message in err


def test_first_prompts_are_distinct_and_in_order():
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt_ids": p, "chosen_ids": [c]} for p, c in
                            [([1, 5], 7), ([1, 5], 8), ([1, 6], 9), ([1, 4], 10), ([1, 3], 11)]])
    assert evalgen.first_prompts(ds, 3) == [([1, 5], [7]), ([1, 6], [9]), ([1, 4], [10])]
    assert len(evalgen.first_prompts(ds, 10)) == 4  # fewer distinct prompts than asked: all of them


def test_trackers_get_the_table(tmp_path):
    """TensorBoard through its real writer; W&B through the callback's own `_wandb` (a stub here:
    wandb is not installed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback, WandbCallback

    rows = [{"step": 7, "prompt": "a | b", "chosen": "c\nd", "completion": "e", "completion_tokens": 1,
             "ended": True}]
    tb = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tmp_path)))
    logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    wb = WandbCallback.__new__(WandbCallback)  # its __init__ imports wandb
    wb._initialized = True
    wb._wandb = types.SimpleNamespace(run=object(), Table=Table, log=logged.append)
    evalgen.log_to_trackers([object(), tb, wb], 7, rows)
    tb.tb_writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Tensors("eval/generations/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 7 and "a \\| b" in text and "c<br>d" in text
    (entry,) = logged
    assert entry["train/global_step"] == 7
    assert entry["eval/generations"].columns == ["step", "prompt", "chosen", "completion"]
    assert entry["eval/generations"].data == [[7, "a | b", "c\nd", "e"]]


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                               "stage3_param_persistence_threshold": 0},  # shard even tiny tensors
         "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


@pytest.mark.parametrize("sharding", ["ddp", "zero3"])
def test_two_processes(ws, tmp_path, sharding):
    """DDP: the first process generates while the other waits at the next collective step. ZeRO-3:
    both take part in every forward (the weights are partitioned). Either way the table is written
    once per evaluation, and the run ends (no process waits forever)."""
    out = tmp_path / "out"
    extra = []
    if sharding == "zero3":
        (tmp_path / "ds_zero3.json").write_text(json.dumps(ZERO3))
        extra = ["--deepspeed", str(tmp_path / "ds_zero3.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as tests/conftest.py
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "prefopt", "train", str(ws.root / "config.yaml"), "--output_dir", str(out),
           "--per_device_train_batch_size", "2", "--generate_during_eval", "true", "--eval_generation_prompts", "2",
           "--eval_generation_max_new_tokens", "3", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ws.root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("DeepSpeed ZeRO-3" if sharding == "zero3" else "DDP") in done.stdout
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 2, 4, 4]
    assert rows[0]["prompt"] == rows[2]["prompt"] != rows[1]["prompt"]
