"""Every example in configs/ (and its subfolders) is headed by its launch command, loads, explains
itself, and trains a step on a tiny local model with local data (or, asking for what this machine
lacks, stops before loading with the reason). The accelerate configs under configs/accelerate/
load as accelerate reads them; configs/slurm/train.sbatch runs in tests/test_multinode.py. Every
file under configs/ is one of these, so a new one is tested wherever it is put."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from prefopt.cli import main
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs"
ACCELERATE = SHIPPED / "accelerate"  # accelerate launch --config_file ...: not prefopt configs
SLURM = [SHIPPED / "slurm" / "train.sbatch"]  # run by tests/test_multinode.py
YAML = sorted(p for p in SHIPPED.rglob("*") if p.suffix in (".yaml", ".yml"))
ACCELERATE_CONFIGS = [p for p in YAML if ACCELERATE in p.parents]
CONFIGS = [p for p in YAML if ACCELERATE not in p.parents]  # prefopt training configs, in any other folder
# what `accelerate launch` needs of a config file: where, how, with what precision, on how many
ACCELERATE_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "num_machines", "num_processes",
                   "machine_rank"}


def _name(path: Path) -> str:
    return str(path.relative_to(SHIPPED).with_suffix(""))


@pytest.fixture(scope="module")
def local(workspace):
    """A tiny model, and chat pairs as the data's own train and test splits."""
    return workspace("shipped", {"train": (8, 1), "test": (4, 1)}, chat=True).root


def test_every_file_in_configs_is_tested():
    found = sorted(p for p in SHIPPED.rglob("*") if p.is_file())
    assert found == sorted(CONFIGS + ACCELERATE_CONFIGS + SLURM)
    assert CONFIGS and ACCELERATE_CONFIGS and all(p.is_file() for p in SLURM)


def test_there_is_one_example_per_method():
    methods = {load_config(str(p)).objective.method for p in CONFIGS}
    assert methods == {"simpo", "cpo_simpo", "alphapo", "cpo", "orpo"}


@pytest.mark.parametrize("path", CONFIGS, ids=[_name(p) for p in CONFIGS])
def test_shipped_config(path, local, tmp_path, capsys):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    launch = [line for line in header if "prefopt train" in line]
    assert launch and str(path.relative_to(ROOT)) in launch[0], "the header names how to launch this file"
    assert main(["config", "explain", str(path)]) == 0
    overrides = ["--model_name_or_path", str(local / "model"), "--dataset_mixer", json.dumps({str(local / "data"): 1.0}),
                 "--dataset_splits", "[train, test]", "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "out"),
                 "--test_split_size", "0"]  # the data's own test split (a share of 8 rows holds out less than a pair)
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    cfg = load_config(str(path))
    if (cfg.model.load_in_4bit or cfg.model.load_in_8bit) and not torch.cuda.is_available():
        assert code == 2 and "needs bitsandbytes on a CUDA GPU" in err
        return
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[_name(p) for p in ACCELERATE_CONFIGS])
def test_accelerate_config(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    launch = [line for line in header if "accelerate launch" in line]
    assert launch and f"--config_file {path.relative_to(ROOT)}" in launch[0], "the header names how to launch it"
    keys = yaml.safe_load(path.read_text())
    assert ACCELERATE_KEYS <= set(keys), f"{path} lacks {sorted(ACCELERATE_KEYS - set(keys))}"
    assert keys["num_processes"] % keys["num_machines"] == 0  # as many processes on every machine
    assert (keys["num_machines"] > 1) == ("main_process_ip" in keys)  # several machines meet at the first
    ClusterConfig.from_yaml_file(path)  # accelerate's own reading: no unknown keys, known environment and type
