"""TRL's ModelConfig keys (use_rslora, use_dora, lora_target_parameters, lora_task_type,
bnb_4bit_quant_storage, model_init_kwargs) as the model is built from them, and flash attention
refused before loading where it cannot run."""

import math

import pytest
import torch
from peft import PeftModel

from prefopt.config import ModelArgs, build_config
from prefopt.demo import task_corpus
from prefopt.errors import PrefoptError
from prefopt.model_options import (check_attention, check_model_args, from_pretrained_kwargs, quantization_config,
                                   read_init_kwargs)
from prefopt.models import load_model, load_tokenizer
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama and a tiny Mixtral (experts held as 3-D parameters), saved with a tokenizer."""
    root = tmp_path_factory.mktemp("model_options")
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    for arch in ("llama", "mixtral"):
        save_tiny(tiny_model(arch, tok, seed=0), tok, root / arch)
    return root


def load(folders, tmp_path, arch="llama", **keys):
    m = ModelArgs(model_name_or_path=str(folders / arch), **keys)
    training = build_config({"output_dir": str(tmp_path), "method": "simpo"}).training
    return load_model(m, load_tokenizer(m), training, log=lambda *a: None)


def lora_layers(model):
    return [mod for mod in model.modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rslora_scales_by_alpha_over_the_root_of_r(folders, tmp_path, use_rslora):
    model = load(folders, tmp_path, use_peft=True, lora_r=4, lora_alpha=8, use_rslora=use_rslora)
    assert isinstance(model, PeftModel) and model.peft_config["default"].use_rslora is use_rslora
    layers = lora_layers(model)
    assert layers
    # the same expression peft evaluates, so exact: alpha / sqrt(r) = 4 (rsLoRA), alpha / r = 2 (LoRA)
    expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert {layer.scaling["default"] for layer in layers} == {expected}


def test_dora_adds_trainable_magnitudes_at_the_weight_norms(folders, tmp_path):
    model = load(folders, tmp_path, use_peft=True, lora_r=4, lora_alpha=8, use_dora=True)
    assert model.peft_config["default"].use_dora
    layers = lora_layers(model)
    magnitudes = [layer.lora_magnitude_vector["default"].weight for layer in layers]
    assert len(magnitudes) == len(layers) > 0 and all(m.requires_grad for m in magnitudes)
    for layer, magnitude in zip(layers, magnitudes):
        # DoRA starts from m = ||W|| per output row; B = 0 at init, so W + s·B·A is W exactly
        torch.testing.assert_close(magnitude, torch.linalg.norm(layer.base_layer.weight, dim=1), rtol=0, atol=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(ids, labels=ids).loss.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in magnitudes)


def test_target_parameters_adapt_the_experts(folders, tmp_path):
    model = load(folders, tmp_path, arch="mixtral", use_peft=True, lora_r=4, lora_alpha=8,
                 lora_target_parameters=["experts.gate_up_proj"])
    config = model.peft_config["default"]
    assert config.target_parameters == {"experts.gate_up_proj"} or config.target_parameters == ["experts.gate_up_proj"]
    # parameter targeting has no dropout: with disable_dropout (the default) it is asked for with 0
    assert config.lora_dropout == 0.0
    lora = {n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert lora and all(".mlp.experts.lora_" in n for n in lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_target_parameters_refusals(folders, tmp_path):
    with pytest.raises(PrefoptError, match=r"lora_target_parameters \['experts.nope'\]: not in this model.*"
                                           r"experts.gate_up_proj"):
        load(folders, tmp_path, arch="mixtral", use_peft=True, lora_target_parameters=["experts.nope"])
    base = dict(model_name_or_path="m", use_peft=True, lora_target_parameters=["experts.gate_up_proj"])
    with pytest.raises(PrefoptError, match="use_dora with lora_target_parameters"):
        check_model_args("c.yaml", ModelArgs(**base, use_dora=True))
    with pytest.raises(PrefoptError, match="lora_dropout 0.05 and disable_dropout: false.*Set lora_dropout: 0"):
        check_model_args("c.yaml", ModelArgs(**base, disable_dropout=False))
    check_model_args("c.yaml", ModelArgs(**base, disable_dropout=False, lora_dropout=0.0))


def test_lora_task_type_is_causal_lm_in_any_case(folders, tmp_path):
    check_model_args("c.yaml", ModelArgs(lora_task_type="causal_lm"))
    model = load(folders, tmp_path, use_peft=True, lora_task_type="Causal_LM")
    assert str(model.peft_config["default"].task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    with pytest.raises(PrefoptError, match=r"c.yaml: lora_task_type 'SEQ_CLS' is a PEFT task type for another kind"
                                           r".*always CAUSAL_LM"):
        check_model_args("c.yaml", ModelArgs(lora_task_type="SEQ_CLS"))
    with pytest.raises(PrefoptError, match=r"lora_task_type 'causal' is not a PEFT task type \(SEQ_CLS, .*CAUSAL_LM"):
        check_model_args("c.yaml", ModelArgs(lora_task_type="causal"))


def test_quant_storage_reaches_the_bitsandbytes_config():
    m = ModelArgs(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16", bnb_4bit_compute_dtype="bfloat16")
    check_model_args("c.yaml", m)
    built = from_pretrained_kwargs(m, quantize=True)["quantization_config"]
    assert built.load_in_4bit and built.bnb_4bit_quant_storage == torch.bfloat16
    assert built.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(ModelArgs(load_in_4bit=True)).bnb_4bit_quant_storage == torch.uint8  # bnb's default
    assert "quantization_config" not in from_pretrained_kwargs(m, quantize=False)
    with pytest.raises(PrefoptError, match=r"c.yaml: bnb_4bit_quant_storage must be uint8, float16, bfloat16 or "
                                           r"float32, got 'bf16'"):
        check_model_args("c.yaml", ModelArgs(load_in_4bit=True, bnb_4bit_quant_storage="bf16"))
    with pytest.raises(PrefoptError, match="bnb_4bit_compute_dtype must be float32, bfloat16 or float16, got 'auto'"):
        check_model_args("c.yaml", ModelArgs(load_in_4bit=True, bnb_4bit_compute_dtype="auto"))


def test_model_init_kwargs_are_read_as_prefopt_keys():
    notes = []
    kwargs = {"torch_dtype": "bfloat16", "attn_implementation": "eager", "revision": "v1",
              "trust_remote_code": True, "use_cache": False}
    m = read_init_kwargs("c.yaml", ModelArgs(model_init_kwargs=kwargs), notes)
    assert (m.dtype, m.attn_implementation, m.model_revision, m.trust_remote_code) == ("bfloat16", "eager", "v1", True)
    assert m.model_init_kwargs == {"use_cache": False}
    assert "model_init_kwargs.torch_dtype read as dtype: bfloat16" in notes and len(notes) == 4
    assert read_init_kwargs("c.yaml", m) == m  # folding twice changes nothing
    assert read_init_kwargs("c.yaml", ModelArgs(model_init_kwargs={"dtype": torch.float16})).dtype == "float16"
    same = read_init_kwargs("c.yaml", ModelArgs(dtype="bfloat16", model_init_kwargs={"torch_dtype": "bfloat16"}))
    assert same.dtype == "bfloat16" and same.model_init_kwargs is None


@pytest.mark.parametrize("model, kwargs, message", [
    ({"dtype": "float16"}, {"torch_dtype": "bfloat16"},
     r"model_init_kwargs.torch_dtype is 'bfloat16' but dtype is 'float16'"),
    ({"attn_implementation": "sdpa"}, {"attn_implementation": "eager"},
     r"model_init_kwargs.attn_implementation is 'eager' but attn_implementation is 'sdpa'"),
    ({"model_revision": "v2"}, {"revision": "v1"}, r"model_init_kwargs.revision is 'v1' but model_revision is 'v2'"),
    ({}, {"torch_dtype": "bfloat16", "dtype": "float16"},
     r"model_init_kwargs gives torch_dtype 'bfloat16' and dtype 'float16', two names of one argument"),
    ({}, {"device_map": "auto"}, r"model_init_kwargs.device_map: prefopt places the model itself"),
    ({}, {"token": "hf_x"}, r"model_init_kwargs.token: a token would be saved in prefopt_config.yaml .*HF_TOKEN"),
    ({}, {"use_auth_token": "hf_x"}, r"model_init_kwargs.use_auth_token: a token would be saved"),
    ({}, {"quantization_config": {"load_in_4bit": True}},
     r"model_init_kwargs.quantization_config: .*use load_in_4bit or load_in_8bit with bnb_4bit_quant_type"),
    ({}, {"use_safetensors": False}, r"model_init_kwargs.use_safetensors: .*allow_pickle_weights"),
    ({}, {"torch_dtype": "bf16"}, r"model_init_kwargs.torch_dtype must be auto, float32, bfloat16 or float16"),
    ({}, {"trust_remote_code": "yes"}, r"model_init_kwargs.trust_remote_code must be a bool"),
    ({}, ["use_cache"], r"model_init_kwargs must map from_pretrained argument names to values"),
])
def test_model_init_kwargs_refusals(model, kwargs, message):
    with pytest.raises(PrefoptError, match=f"^c.yaml: {message}"):
        read_init_kwargs("c.yaml", ModelArgs(**model, model_init_kwargs=kwargs))


def test_model_init_kwargs_pass_through_to_from_pretrained(folders, tmp_path):
    assert load(folders, tmp_path).config.use_cache is True  # the saved config's, as the control
    model = load(folders, tmp_path, model_init_kwargs={"use_cache": False, "torch_dtype": "bfloat16"})
    assert model.config.use_cache is False
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(PrefoptError, match=r"^model_init_kwargs \['not_an_argument'\]: from_pretrained of .* failed "
                                           r"with them: .*'not_an_argument'"):
        load(folders, tmp_path, model_init_kwargs={"not_an_argument": 1})


def test_flash_attention_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PrefoptError, match=r"^c.yaml: attn_implementation flash_attention_2 \(what "
                                           r"use_flash_attention_2: true asks for\) needs the flash-attn package .* "
                                           r"no CUDA GPU. Use attn_implementation: sdpa"):
        check_attention("c.yaml", ModelArgs(attn_implementation="flash_attention_2"))
    with pytest.raises(PrefoptError, match=r"flash_attention_3 needs .*Use attn_implementation: sdpa"):
        check_attention("c.yaml", ModelArgs(attn_implementation="flash_attention_3"))
    for fine in (None, "sdpa", "eager"):
        check_attention("c.yaml", ModelArgs(attn_implementation=fine))


def test_flash_attention_refused_without_the_package(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(PrefoptError, match=r"flash_attention_2 .*it is not installed here.*attn_implementation: sdpa"):
        check_attention("c.yaml", ModelArgs(attn_implementation="flash_attention_2"))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    check_attention("c.yaml", ModelArgs(attn_implementation="flash_attention_2"))


def test_use_flash_attention_2_from_a_config_is_refused_before_loading(monkeypatch, folders, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_config({"output_dir": str(tmp_path), "method": "simpo", "use_flash_attention_2": True,
                        "model_name_or_path": str(folders / "llama")}, where="run.yaml")
    with pytest.raises(PrefoptError, match=r"^run.yaml: attn_implementation flash_attention_2 \(what "
                                           r"use_flash_attention_2: true asks for\)"):
        check_attention(cfg.source, cfg.model)
    # load_model refuses it too, before from_pretrained (which would raise an ImportError)
    with pytest.raises(PrefoptError, match="Use attn_implementation: sdpa"):
        load(folders, tmp_path, attn_implementation="flash_attention_2")


def test_a_dora_rslora_run_saves_an_adapter_that_records_them(workspace, tmp_path):
    """Through the pipeline: the saved adapter_config.json is what PEFT reloads the adapter with."""
    import json

    from prefopt.pipeline import train

    ws = workspace("model_options_run", {"train": (8, 0)})
    values = {"model_name_or_path": str(ws.model), "dataset_mixer": {str(ws.data): 1.0}, "dataset_splits": ["train"],
              "method": "simpo", "learning_rate": 1e-2, "max_steps": 2, "per_device_train_batch_size": 4,
              "logging_steps": 1,
              "output_dir": str(tmp_path / "out"), "report_to": "none", "save_strategy": "no", "use_peft": True,
              "lora_r": 4, "lora_alpha": 8, "use_dora": True, "use_rslora": True, "lora_task_type": "causal_lm",
              "model_init_kwargs": {"use_cache": False}}
    result = train(build_config(values), log=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True and saved["task_type"] == "CAUSAL_LM"
    losses = [line["loss"] for line in result.trainer.state.log_history if "loss" in line]
    assert losses and all(math.isfinite(x) for x in losses)
