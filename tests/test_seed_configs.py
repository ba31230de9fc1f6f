"""Every seed config trains on this machine with only the model and the data pointed at local
copies — or, where it asks for what a CPU cannot do, stops before loading anything and says what
to change."""

import json
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.config import load_config

SEEDS = Path(__file__).parent / "fixtures" / "seed_configs"
TRAINS = ["phi3-mini4k-cpo-simpo.yaml", "mistral-7b-base-simpo.yaml", "llama3-8b-instruct-simpo.yaml",
          "deepseek-math-simpo.yaml", "elyza-llama3-simpo.yaml"]
REFUSES = {
    "llama3-8b-orpo-qlora.yaml": "load_in_4bit needs bitsandbytes on a CUDA GPU",
    "elyza-llama3-diversity-simpo.yaml": "report_to wandb: not installed",
}


def local(workspace, cfg):
    """The tiny model, and chat pairs in one jsonl per split the config names (train_prefs.jsonl,
    test.jsonl, ...)."""
    splits = [s.split for s in cfg.data.train_datasets + cfg.data.eval_datasets]
    return workspace("seed", {split: (16, i) for i, split in enumerate(splits)}, chat=True)


@pytest.mark.parametrize("name", TRAINS)
def test_seed_config_trains_with_model_and_data_overrides(name, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the seeds' relative output_dirs land here
    cfg = load_config(SEEDS / name)
    ws = local(workspace, cfg)
    argv = ["train", str(SEEDS / name), "--model_name_or_path", str(ws.model), "--dataset_mixer", f"{{{ws.data}: 1.0}}"]
    assert main(argv) == 0
    out = tmp_path / cfg.training.output_dir
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in l for l in lines) or any("train_loss" in l for l in lines)
    assert any("eval_rewards/accuracies" in l for l in lines)  # the config's test split was evaluated
    assert (out / "model.safetensors").is_file() and (out / "prefopt_config.yaml").is_file()


@pytest.mark.parametrize("name", sorted(REFUSES))
def test_seed_config_that_needs_more_stops_before_loading(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing_model = tmp_path / "never-loaded"
    assert main(["train", str(SEEDS / name), "--model_name_or_path", str(missing_model)]) == 2
    assert REFUSES[name] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_diversity_seed_trains_with_its_term(workspace, tmp_path, monkeypatch):
    """(Its report_to wandb is refused above when wandb is not installed; without a tracker it trains.)"""
    monkeypatch.chdir(tmp_path)
    name = "elyza-llama3-diversity-simpo.yaml"
    cfg = load_config(SEEDS / name)
    ws = local(workspace, cfg)
    argv = ["train", str(SEEDS / name), "--model_name_or_path", str(ws.model), "--dataset_mixer", f"{{{ws.data}: 1.0}}",
            "--report_to", "none", "--max_steps", "2", "--logging_steps", "1"]
    assert main(argv) == 0
    lines = [json.loads(l) for l in (tmp_path / cfg.training.output_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [l for l in lines if "diversity/entropy" in l]
    assert logged and all(l["diversity/entropy"] > 0 and l["diversity/kl"] >= 0 for l in logged)
    first = logged[0]
    assert first["diversity/loss"] == pytest.approx(-0.1 * first["diversity/entropy"] + 0.9 * first["diversity/kl"])
