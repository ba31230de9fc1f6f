"""Tier three: the real CLI end to end on tiny models saved to local folders, asserting on the
files written and the numbers logged; and the first step's numbers against TRL's own trainer
run on the same files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.cli import main
from prefopt.demo import make_rows, task_corpus
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    for arch in ("llama", "qwen2"):
        save_tiny(tiny_model(arch, tok, seed=0), tok, root / arch)
    for chat in (False, True):
        for split, n, seed in (("train", 24, 0), ("test", 8, 1)):
            path = root / ("chat" if chat else "text") / f"{split}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed, chat=chat)))
    return root


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch, data, method", [("llama", "chat", "simpo"), ("qwen2", "text", "orpo"),
                                                 ("llama", "text", "cpo")])
def test_train_end_to_end(workspace, tmp_path, arch, data, method, capsys):
    out = tmp_path / "run"
    config = {
        "model_name_or_path": str(workspace / arch),
        "dataset_mixer": {str(workspace / data): 1.0},
        "dataset_splits": ["train", "test"],
        "method": method,
        "learning_rate": 1e-3,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_steps": 2,
        "output_dir": str(out),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml"), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"method" in printed and method in printed  # the resolved summary
    assert "24 of 24 pairs kept" in printed
    assert "prefopt: done: 4 steps in" in printed and "pairs/s" in printed  # the summary
    assert "final eval (step 4): loss" in printed and "best eval accuracy" in printed
    assert f"model and tokenizer: {out}" in printed

    lines = read_metrics(out)
    train = [l for l in lines if "loss" in l]
    evals = [l for l in lines if "eval_loss" in l]
    assert [l["step"] for l in train] == [1, 2, 3, 4]
    assert [l["step"] for l in evals] == [2, 4]  # no duplicate evaluation at the end
    for l in train:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in l.items() if isinstance(v, float))
        assert l["learning_rate"] > 0 and l["grad_norm"] > 0
    if method == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen", "eval_log_odds_ratio"} <= set(train[0]) | set(evals[0])
    assert train[-1]["loss"] < train[0]["loss"]  # lr 1e-3 on 24 pairs: it learns

    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["kept"] == 24 and report["eval"]["kept"] == 8
    resolved = yaml.safe_load((out / "prefopt_config.yaml").read_text())
    assert resolved["method"] == method and resolved["seed"] == 3
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    pngs = {p.name for p in (out / "plots").iterdir()}
    assert {"overview.png", "loss.png", "rewards.png", "lengths.png", "learning_rate.png"} <= pngs
    assert ("nll.png" in pngs) == (method != "simpo") and ("log_odds.png" in pngs) == (method == "orpo")
    assert train[0]["lengths/chosen"] > 0 and "eval_lengths/rejected" in evals[0]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # saved with the model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 3 1 2"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    trained = dict(model.named_parameters())
    initial = dict(AutoModelForCausalLM.from_pretrained(workspace / arch).named_parameters())
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)


@pytest.mark.parametrize("data", ["chat", "text"])
def test_first_step_equals_trl_trainer_on_the_same_files(workspace, tmp_path, data):
    """A TRL user's keys, TRL's CPOTrainer on the same model folder and jsonl: same first step."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import load_dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    keys = dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.05, learning_rate=1e-3,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, seed=5, max_length=64)
    trl_args = CPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, gradient_checkpointing=False, use_cpu=True,
                         report_to="none", save_strategy="no", **keys)
    model_dir = workspace / "llama"
    trl = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=trl_args,
                     train_dataset=load_dataset("json", data_files=str(workspace / data / "train.jsonl"), split="train"),
                     processing_class=AutoTokenizer.from_pretrained(model_dir))
    trl.train()
    theirs = next(l for l in trl.state.log_history if "loss" in l)

    out = tmp_path / "ours"
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(workspace / data / "train.jsonl"),
            "--output_dir", str(out), "--save_strategy", "no"]
    for k, v in keys.items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 0
    ours = read_metrics(out)[0]
    compared = [k for k in theirs if k not in ("epoch", "step") and not k.startswith("logits/")]
    assert {"loss", "grad_norm", "rewards/accuracies", "nll_loss", "logps/chosen"} <= set(compared)
    for k in compared:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-6), k


def test_bad_config_exits_2_with_the_message(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("method: simpo\nbetta: 2\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "c.yaml: unknown key 'betta'. Did you mean 'beta'?" in err


def test_python_dash_m_and_config_explain(tmp_path):
    (tmp_path / "c.yaml").write_text("loss_type: simpo\nbeta: 10\nsimpo_gamma: 5.4\ncpo_alpha: 0.05\n")
    done = subprocess.run([sys.executable, "-m", "prefopt", "config", "explain", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, check=True)
    assert "cpo_simpo" in done.stdout and "0.54" in done.stdout and "0.05" in done.stdout


def test_quantization_refused_on_cpu_before_loading(tmp_path, capsys):
    seeds = Path(__file__).parent / "fixtures" / "seed_configs"
    code = main(["train", str(seeds / "llama3-8b-orpo-qlora.yaml"), "--model_name_or_path", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err
    assert "load_in_4bit needs bitsandbytes on a CUDA GPU" in err and "Set load_in_4bit: false" in err


def test_config_errors_from_a_real_process_are_one_line(tmp_path):
    """`python -m prefopt`, as a user runs it: a key given twice and a UTF-16 file exit 2 with one
    line on stderr and no traceback (the in-process cases: tests/test_config_yaml.py)."""
    def explain(content: bytes) -> subprocess.CompletedProcess:
        (tmp_path / "c.yaml").write_bytes(content)
        return subprocess.run([sys.executable, "-m", "prefopt", "config", "explain", str(tmp_path / "c.yaml")],
                              capture_output=True, text=True)

    twice = explain(b"method: simpo\nbeta: 2.0\nbeta: 20.0\n")
    assert twice.returncode == 2 and twice.stdout == ""
    assert twice.stderr == (f"prefopt: error: {tmp_path / 'c.yaml'}: 'beta' is given twice (line 2 and line 3); YAML "
                            "would silently keep the second. Keep one.\n")
    utf16 = explain("method: simpo\n".encode("utf-16"))  # with its byte-order mark, as Python writes it
    assert utf16.returncode == 2 and utf16.stderr.count("\n") == 1 and "Traceback" not in utf16.stderr
    assert "the file is UTF-16 (" in utf16.stderr and "save it as UTF-8" in utf16.stderr


# The options of every command: --help, booleans, unknown options (argparse in prefopt's style)

def test_every_command_has_help_and_loads_nothing_for_it():
    """`prefopt COMMAND --help` (and -h) prints its usage and exits 0, before importing torch,
    transformers or datasets (train's and config's help does not start the demo or read a file)."""
    script = """
import sys
from prefopt.cli import COMMANDS, main
for command in [[c] for c in COMMANDS] + [["config", "explain"], ["config", "keys"]]:
    for flag in ("--help", "-h"):
        assert main([*command, flag]) == 0, command
print("loaded:", sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("loaded: []")
    from prefopt.cli import COMMANDS

    for command in COMMANDS:
        assert done.stdout.count(f"usage: prefopt {command} ") == (6 if command == "config" else 2), command
    assert "--key value" in done.stdout  # train's and config's free-form overrides are documented
    assert done.stdout.count("usage: prefopt config keys") == 2  # the subcommand's own help, not config's
    from prefopt import cli, explanation

    assert cli.KEY_SECTIONS == explanation.KEY_SECTIONS


class FakeGenerator:
    """Stands in for evaluate.Generator: records the generation settings the CLI passed."""
    seen: dict = {}

    def __init__(self, model_dir: str, **generation):
        FakeGenerator.seen = generation
        self.name = "fake"

    def answer(self, conversations, progress):
        return ["an answer"] * len(conversations)


@pytest.mark.parametrize("options, do_sample", [
    (["--do_sample", "True"], True), (["--do_sample=yes"], True), (["--do_sample", "1"], True),
    (["--do_sample", "FALSE"], False), (["--do_sample", "no"], False), (["--do_sample", "0"], False),
    (["--temperature", "0.7"], True),  # sampling settings imply sampling...
    (["--temperature", "0.7", "--do_sample", "false"], False),  # ...unless told otherwise
    ([], None),  # not given: the model's generation config decides
])
def test_generate_reads_booleans_in_any_spelling(monkeypatch, capsys, options, do_sample):
    monkeypatch.setattr("prefopt.evaluation.Generator", FakeGenerator)
    assert main(["generate", "--model", "m", "--prompt", "Sort: 2 1", *options]) == 0
    assert FakeGenerator.seen.get("do_sample") == do_sample
    assert "> Sort: 2 1\nan answer" in capsys.readouterr().out


def test_eval_passes_every_option(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("prefopt.evaluation.evaluate", lambda models, **kw: seen.update(models=models, **kw) or {})
    monkeypatch.setattr("prefopt.evaluation.format_report", lambda report: "the report")
    assert main(["eval", "--model", "a", "--model=b", "--data", "d", "--prompts", "p", "--reward_model", "r",
                 "--alpaca_eval", "al", "--max_new_tokens", "7", "--top_p", "0.9", "--seed", "3"]) == 0
    assert seen == dict(models=["a", "b"], data="d", split=None, prompts="p", reward_model="r", alpaca_dir="al",
                        seed=3, max_new_tokens=7, top_p=0.9, do_sample=True)
    assert "the report" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["eval", "--model", "m", "--do_sample", "maybe"], "prefopt eval: argument --do_sample: 'maybe' is not a boolean"),
    (["generate", "--model", "m", "--do_sample", "maybe"], "prefopt generate: argument --do_sample: 'maybe'"),
    (["eval", "--model", "m", "--modle", "n"], "prefopt eval: unrecognized arguments: --modle"),
    (["generate", "--model", "m", "--promt", "hi"], "prefopt generate: unrecognized arguments: --promt"),
    (["merge", "adapter", "--output", "o", "--dtpye", "bfloat16"], "prefopt merge: unrecognized arguments: --dtpye"),
    (["merge", "adapter", "--out", "o"], "prefopt merge: unrecognized arguments: --out"),  # no abbreviations
    (["plot", "run", "--png"], "prefopt plot: unrecognized arguments: --png"),
    (["eval", "--model", "m", "--max_new_tokens", "x"], "prefopt eval: argument --max_new_tokens: invalid int value"),
    (["eval"], "prefopt eval: the following arguments are required: --model"),
])
def test_bad_options_exit_2_naming_the_command_and_the_option(capsys, argv, named):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefopt: error: {named}") and f"usage: prefopt {argv[0]}" in err


def test_bad_option_from_a_real_process_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "prefopt", "eval", "--model", "m", "--do_sample", "maybe"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("prefopt: error: prefopt eval: argument --do_sample: 'maybe' is not a boolean: "
                                  "use true or false (or 1/0, yes/no).\nusage: prefopt eval")


def test_version_a_mistyped_command_and_every_config_key(capsys):
    from prefopt import __version__
    from prefopt.values import DATA_KEYS, MODEL_KEYS, OBJECTIVE_KEYS, RUN_KEYS

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"prefopt {__version__}\n"
    assert main(["trian", "c.yaml"]) == 2
    assert "prefopt: unknown command 'trian'. Did you mean 'train'?" in capsys.readouterr().err
    assert main(["config", "keys"]) == 0
    listed = capsys.readouterr().out
    names = {line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("    ")}
    assert MODEL_KEYS | DATA_KEYS | OBJECTIVE_KEYS | RUN_KEYS <= names and "learning_rate" in names
    assert "  learning_rate  (float, default 1e-06)" in listed  # prefopt's default, not transformers' 5e-05
    assert "      β: reward scale (λ for ORPO)." in listed  # the dataclasses' help, read at last
    assert main(["config", "keys", "--section", "run"]) == 0
    run = capsys.readouterr().out
    assert run.startswith("run:\n") and "generate_during_eval" in run and "learning_rate" not in run
    assert main(["config", "keys", "--section", "bogus"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
