"""prefopt from Python (`prefopt.api`): the README's "From Python" examples run as written, a
config given as a path, a dict or a Config, keyword overrides, the same errors, a running event
loop, and `import prefopt` staying light."""

import asyncio
import doctest
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import prefopt
from prefopt import api
from prefopt.errors import PrefoptError

ROOT = Path(__file__).resolve().parents[1]


def readme_examples(section: str = "From Python") -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.fixture(scope="module")
def folder(workspace, tmp_path_factory):
    """What the README's examples name: my-sft-model (a tiny chat model) and data/{train,test}.jsonl."""
    ws = workspace("api", {"train": (32, 1), "test": (8, 2)}, chat=True)
    root = tmp_path_factory.mktemp("api_cwd")
    shutil.copytree(ws.model, root / "my-sft-model")
    shutil.copytree(ws.data, root / "data")
    return root


def test_the_readmes_python_examples_run_as_written(folder, monkeypatch, capsys):
    examples = readme_examples()
    assert len(examples) == 3  # the API's two, then the TRL drop-in's
    monkeypatch.chdir(folder)
    namespace: dict = {}
    for code in examples:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    result, report, answers = namespace["result"], namespace["report"], namespace["answers"]
    assert namespace["trainer"].state.global_step == 4 and (folder / "runs/dropin/model.safetensors").is_file()
    assert Path(result.output_dir) == Path("runs/simpo") and (folder / "runs/simpo/model.safetensors").is_file()
    assert result.trainer.state.global_step == 2 and result.trainer.args.learning_rate == 5e-7
    assert 0 <= result.eval_metrics["eval_rewards/accuracies"] <= 1
    assert set(report["preference"]) == {"my-sft-model", "simpo"} and report["preference"]["simpo"]["pairs"] == 8
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert "method             simpo" in capsys.readouterr().out  # explain's rows, printed


def test_a_config_is_a_path_a_dict_or_a_config_and_keywords_override(tmp_path):
    keys = {"method": "simpo", "beta": 2.5, "output_dir": str(tmp_path / "o")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(keys))
    from_path = prefopt.load_config(path, beta=3.0, lora_target_modules=["q_proj", "v_proj"])
    from_dict = prefopt.load_config(keys, beta=3.0, lora_target_modules=["q_proj", "v_proj"])
    for cfg in (from_path, from_dict, prefopt.load_config(str(path), beta=3.0, lora_target_modules=["q_proj", "v_proj"])):
        assert cfg.objective.beta == 3.0 and cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert prefopt.load_config(from_dict) is from_dict
    assert prefopt.explain(from_dict) == prefopt.explain(keys, beta=3.0, lora_target_modules=["q_proj", "v_proj"])
    # a string stays the string given, whichever form the config takes (YAML would read on as true, 007 as 7)
    for cfg in (prefopt.load_config(path, run_name="007", hub_model_id="on"),
                prefopt.load_config(keys, run_name="007", hub_model_id="on")):
        assert (cfg.training.run_name, cfg.training.hub_model_id) == ("007", "on")
    for form in (path, keys):  # HfArgumentParser's no_<flag>, as on the command line
        assert prefopt.load_config(form, no_disable_dropout=True).model.disable_dropout is False
    # another tool's dialect, as in a YAML file
    assert prefopt.load_config({"loss_type": "simpo", "cpo_alpha": 0.05, "output_dir": "o"}).objective.method == "cpo_simpo"


def test_the_same_errors_as_the_command_line(tmp_path):
    with pytest.raises(PrefoptError, match="a Config takes no overrides \\(beta\\)"):
        prefopt.load_config(prefopt.load_config({"method": "simpo"}), beta=2.0)
    with pytest.raises(PrefoptError, match="expected a YAML path, a dict of config keys or a Config, got list"):
        prefopt.load_config(["method", "simpo"])
    with pytest.raises(PrefoptError, match="unknown key 'betta'. Did you mean 'beta'"):
        prefopt.load_config({"method": "simpo", "betta": 2.0})
    with pytest.raises(PrefoptError, match="unknown option '--betta'"):
        prefopt.load_config(None, method="simpo", betta=2.0)
    with pytest.raises(PrefoptError, match="keyword arguments: 'beta' and 'pref_beta' say the same thing"):
        prefopt.load_config({"method": "simpo"}, beta=2.0, pref_beta=2.0)
    # (a keyword wins over the dict's other spelling of its key, as the command line over the file's)
    assert prefopt.load_config({"method": "simpo", "beta": 2.0}, pref_beta=3.0).objective.beta == 3.0
    with pytest.raises(PrefoptError, match="unknown generation setting 'max_tokens'"):
        prefopt.generate(tmp_path, "hi", max_tokens=3)
    for bad, message in ((5, "generate: give a prompt, a conversation or a list of them, got 5"),
                         ({"role": "user", "content": "hi"}, "generate: give a prompt"),
                         (["hi", 3], "generate: prompt 1 is 3")):
        with pytest.raises(PrefoptError, match=message):
            prefopt.generate(tmp_path, bad)
    with pytest.raises(PrefoptError, match="max_new_tokens: expected a number, got 'x'"):
        prefopt.generate(tmp_path, "hi", max_new_tokens="x")
    with pytest.raises(PrefoptError, match="evaluate: models is a folder or a list of folders, got 5"):
        prefopt.evaluate(5, data="d")
    with pytest.raises(PrefoptError, match="a key is 1, not a name"):
        prefopt.load_config({1: 2})
    assert api._conversations([{"role": "user", "content": "hi"}]) == [[{"role": "user", "content": "hi"}]]
    assert api._conversations(["a", [{"role": "user", "content": "b"}]]) == [
        [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert prefopt.PrefoptError is PrefoptError


def test_train_runs_inside_a_running_event_loop_and_keeps_transformers_progress_bars(folder, tmp_path):
    """Jupyter runs cells inside an asyncio loop; a call from there is an ordinary blocking call. The
    run keeps the Trainer's own progress callback where transformers makes it the notebook's there
    (elsewhere prefopt's console replaces the terminal one: tests/test_console.py)."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import ProgressCallback

    from prefopt.console import ConsoleProgress, PlainProgress

    keys = {"model_name_or_path": str(folder / "my-sft-model"), "method": "orpo", "output_dir": str(tmp_path / "o"),
            "dataset_mixer": {str(folder / "data"): 1.0}, "dataset_splits": ["train"], "max_steps": 1}

    async def cell():
        assert asyncio.get_running_loop().is_running()
        return prefopt.train(keys)

    result = asyncio.run(cell())
    assert result.trainer.state.global_step == 1
    shown = (PlainProgress, ConsoleProgress) if DEFAULT_PROGRESS_CALLBACK is ProgressCallback else DEFAULT_PROGRESS_CALLBACK
    assert any(isinstance(c, shown) for c in result.trainer.callback_handler.callbacks)
    again = prefopt.train(keys)  # the finished run is recognised, as on the command line
    assert again.finished and again.trainer is None


def test_the_docstrings_examples_run():
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(api, globs={"prefopt": prefopt}) if t.examples]
    assert tests
    runner = doctest.DocTestRunner()
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def test_import_prefopt_stays_light():
    code = ("import sys, prefopt; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "print(sorted(prefopt.__all__))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert {"train", "load_config", "explain", "evaluate", "generate", "Config", "PrefoptError", "CPOTrainer",
            "ORPOConfig"} <= set(
        json.loads(out.replace("'", '"')))
    assert callable(prefopt.explain) and callable(prefopt.evaluate)  # the functions, not the modules
