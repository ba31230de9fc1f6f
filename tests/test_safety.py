"""Nothing in a config or a model folder runs code unless the config says so: weights load from
safetensors only (pickle needs allow_pickle_weights), remote model code needs
trust_remote_code, and config files are read with YAML's safe loader."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.config import ModelArgs, build_config, load_config
from prefopt.errors import PrefoptError
from prefopt.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def pickled(workspace):
    """The tiny workspace with its model's weights as pickle only (pytorch_model.bin)."""
    ws = workspace("safety", {"train": (8, 0)})
    safetensors = ws.model / "model.safetensors"
    torch.save(load_file(safetensors), ws.model / "pytorch_model.bin")
    safetensors.unlink()
    return ws.root


def test_pickle_only_weights_need_an_explicit_opt_in(pickled, capsys):
    assert not list((pickled / "model").glob("*.safetensors"))
    args = ["train", "--model_name_or_path", str(pickled / "model"), "--dataset_mixer",
            json.dumps({str(pickled / "data" / "train.jsonl"): 1.0}), "--method", "simpo", "--max_steps", "1",
            "--report_to", "none", "--output_dir", str(pickled / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds its weights only as pickle (pytorch_model.bin), which can run code when loaded" in err
    assert "allow_pickle_weights: true" in err and not (pickled / "out").exists()  # refused before anything

    m = ModelArgs(model_name_or_path=str(pickled / "model"), allow_pickle_weights=True)
    cfg = build_config({"output_dir": str(pickled / "o2"), "method": "simpo", "report_to": "none"})
    model = load_model(m, load_tokenizer(m), cfg.training, log=lambda *a: None)
    assert model.get_input_embeddings().weight.shape[0] == len(load_tokenizer(m))


def test_remote_code_is_off_unless_asked():
    assert ModelArgs().trust_remote_code is False
    assert build_config({"output_dir": "x", "method": "simpo"}).model.trust_remote_code is False


def test_config_files_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("method: simpo\nbeta: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(PrefoptError, match=r"evil.yaml: line 2, column 7 is not valid YAML"):
        load_config(str(path))
    assert not (tmp_path / "pwned").exists()
    assert yaml.safe_load("a: 1") == {"a": 1}
