"""LoRA through the real pipeline: gradient checkpointing, new chat tokens on a base model,
saving, reloading, merging, and starting from an existing adapter."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import ROUND_OFF_REL
from prefopt.cli import main
from prefopt.config import build_config
from prefopt.demo import task_corpus
from prefopt.errors import PrefoptError
from prefopt.models import check_saved
from prefopt.pipeline import train
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def ws(workspace):
    """ws/model: an instruct model (ChatML template); ws/data: chat pairs; ws/base: a base model."""
    root = workspace("adapters", {"train": (8, 0)}, chat=True).root
    # a "base" model: no chat template and no <|im_start|>/<|im_end|> in its vocabulary
    base_tok = train_tokenizer(task_corpus(), vocab_size=300, chat_template=None)
    save_tiny(tiny_model("llama", base_tok, seed=0), base_tok, root / "base")
    return root


def run(ws, out, model="model", **keys):
    values = {"model_name_or_path": str(ws / model), "dataset_mixer": {str(ws / "data"): 1.0},
              "dataset_splits": ["train"], "method": "cpo_simpo", "learning_rate": 2e-2, "max_steps": 5,
              "per_device_train_batch_size": 8, "logging_steps": 1, "output_dir": str(out), "report_to": "none",
              "save_strategy": "no", "use_peft": True, "lora_r": 4, "lora_alpha": 8, "seed": 1, **keys}
    return train(build_config(values), log=lambda *a: None)


def losses(result) -> list[float]:
    return [line["loss"] for line in result.trainer.state.log_history if "loss" in line]


def assert_merged_close(merged, adapter):
    """Logits of a merged model against its adapter's. Merging rounds each weight W + s·B·A once
    (u relative), and the forward then sums the same terms in another grouping: round-off of
    another summation order, relative to the size of the logits (tests/helpers.py: ROUND_OFF_REL)."""
    torch.testing.assert_close(merged, adapter, rtol=0, atol=ROUND_OFF_REL * adapter.abs().max().item())


@pytest.mark.parametrize("use_peft", [True, False])
def test_gradient_checkpointing_changes_memory_not_numbers(ws, tmp_path, use_peft):
    start = AutoModelForCausalLM.from_pretrained(ws / "model").state_dict()
    plain = run(ws, tmp_path / "plain", use_peft=use_peft)
    ckpt = run(ws, tmp_path / "ckpt", use_peft=use_peft, gradient_checkpointing=True)
    inner = ckpt.trainer.model.get_base_model() if use_peft else ckpt.trainer.model
    assert inner.model.gradient_checkpointing and not inner.config.use_cache
    # the recomputation repeats the same float32 operations on the same inputs: equal bit for bit,
    # through all five Adam steps
    assert losses(ckpt) == losses(plain)
    assert losses(ckpt)[-1] < losses(ckpt)[0] - 0.05  # the same batch, five steps: it learns

    trained = {n: p for n, p in ckpt.trainer.model.named_parameters()}
    if use_peft:
        adapters = [n for n in trained if "lora_" in n]
        assert adapters and all(trained[n].requires_grad for n in adapters)
        assert any(not torch.equal(trained[n], torch.zeros_like(trained[n])) for n in adapters if "lora_B" in n)
        merged = ckpt.trainer.model.get_base_model().state_dict()
        for name, before in start.items():  # frozen base weights did not move
            key = name.replace(".weight", ".base_layer.weight")
            assert torch.equal(merged.get(key, merged.get(name)), before), name
    else:
        moved = [n for n, p in inner.state_dict().items() if not torch.equal(p, start[n])]
        assert len(moved) == len(start)


def test_chatml_on_a_base_model_trains_and_saves_the_new_token_rows(ws, tmp_path):
    out = tmp_path / "run"
    result = run(ws, out, model="base", chat_template="chatml")
    tok = AutoTokenizer.from_pretrained(out)
    old = len(AutoTokenizer.from_pretrained(ws / "base"))
    assert len(tok) == old + 2 and tok.eos_token == "<|im_end|>"
    model = result.trainer.model
    deltas = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2  # input rows and the untied head's rows
    assert all(p.abs().sum() > 0 for p in deltas.values())  # the new rows were trained
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert any("embed_tokens" in k and shape[0] == len(tok) for k, shape in saved.items())
    check_saved(out)

    ids = torch.tensor([tok("<|im_start|>user\n3 1 2<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(ws / "base")
        base.resize_token_embeddings(len(tok))  # new rows drawn at random: the adapter must bring its own
        reloaded = PeftModel.from_pretrained(base, out)(ids).logits
    assert torch.equal(reloaded, expected)  # the same weights, read back exactly, in the same computation

    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    with torch.no_grad():
        assert_merged_close(merged(ids).logits, expected)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tok.chat_template


def test_an_existing_adapter_is_continued_or_merged_only_when_asked(ws, tmp_path, capsys):
    first = tmp_path / "first"
    run(ws, first)
    with pytest.raises(PrefoptError, match="is a LoRA adapter, not a full model.*existing_adapter: continue.*"
                                           "existing_adapter: merge"):
        run(ws, tmp_path / "x", model=first)
    with pytest.raises(PrefoptError, match="cannot be merged exactly into a quantised base"):
        run(ws, tmp_path / "x", model=first, existing_adapter="merge", load_in_4bit=True, use_peft=False)

    ids = torch.tensor([[3, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(ws / "model")
        saved = PeftModel.from_pretrained(base, first)(ids).logits

    cont = run(ws, tmp_path / "cont", model=first, existing_adapter="continue", max_steps=1, learning_rate=0.0)
    with torch.no_grad():
        assert torch.equal(cont.trainer.model.eval()(ids).logits, saved)  # it starts where it stopped (lr 0)
    assert any(p.requires_grad for n, p in cont.trainer.model.named_parameters() if "lora_" in n)

    merged = run(ws, tmp_path / "merged", model=first, existing_adapter="merge", use_peft=False, max_steps=1,
                 learning_rate=0.0)
    model = merged.trainer.model.eval()
    assert not isinstance(model, PeftModel) and not any("lora_" in n for n in model.state_dict())
    with torch.no_grad():
        assert_merged_close(model(ids).logits, saved)  # the adapter is in the weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # saved as a full model
    with torch.no_grad():
        assert_merged_close(reloaded(ids).logits, saved)


def test_wrong_target_modules_name_the_model_layers(ws, tmp_path):
    with pytest.raises(PrefoptError, match=r"lora_target_modules \['qkv'\]: not in this model.*q_proj"):
        run(ws, tmp_path / "x", lora_target_modules=["qkv"])


def test_merge_refusals(ws, tmp_path, capsys):
    assert main(["merge", str(ws / "model"), "--output", str(tmp_path / "m")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert main(["merge", str(ws / "model")]) == 2
    assert "usage: prefopt merge" in capsys.readouterr().err

    adapter = tmp_path / "adapter"
    run(ws, adapter, max_steps=1)
    quantised = tmp_path / "quantised"
    shutil.copytree(ws / "model", quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    assert main(["merge", str(adapter), "--output", str(tmp_path / "m"), "--base", str(quantised)]) == 2
    err = capsys.readouterr().err
    assert "stored quantised (bitsandbytes)" in err and "--base" in err


def test_check_saved_fails_loudly_on_an_incomplete_model(ws, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(ws / "model", full)
    assert check_saved(full) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(full).parameters())
    from safetensors.torch import load_file, save_file

    weights = load_file(full / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.empty(0)  # what an ungathered ZeRO-3 shard looks like
    del weights["model.norm.weight"]
    save_file(weights, full / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrefoptError, match=r"up_proj.weight: saved empty.*model.norm.weight: missing.*ZeRO-3"):
        check_saved(full)


def test_merge_then_a_new_lora_and_merge_under_zero3_are_refused(ws, tmp_path):
    first = tmp_path / "first"
    run(ws, first, max_steps=1)
    with pytest.raises(PrefoptError, match="merged base that exists nowhere on disk.*use_peft: false"):
        run(ws, tmp_path / "x", model=first, existing_adapter="merge")
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
             "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(PrefoptError, match="merge under DeepSpeed ZeRO-3.*prefopt merge"):
        run(ws, tmp_path / "x", model=first, existing_adapter="merge", use_peft=False, deepspeed=zero3)


def test_check_saved_reads_moe_experts_as_saved_and_only_this_runs_files(ws, tmp_path):
    from prefopt.tiny import tiny_model

    moe = tmp_path / "moe"
    tiny_model("mixtral", 100, seed=0).save_pretrained(moe)  # experts saved one by one (w1/w2/w3)
    assert check_saved(moe) == sum(p.numel() for p in tiny_model("mixtral", 100, seed=0).parameters())

    adapter = tmp_path / "adapter"
    run(ws, adapter, max_steps=1)
    shutil.copy(ws / "model" / "model.safetensors", adapter / "model.safetensors")  # a stray full model
    n = check_saved(adapter)
    assert n < 50_000  # the adapter's own tensors only
    with pytest.raises(PrefoptError, match="no .safetensors weights were written"):
        check_saved(moe, adapter=True)  # an adapter save that wrote no adapter file


def test_the_eos_row_trains_when_pad_is_eos(tmp_path):
    """A config whose pad id is the EOS id makes EOS the embedding's padding_idx (a row that never
    gets a gradient); prefopt masks by length, so it lifts that and EOS trains like any token
    (it is an input wherever a conversation history holds a finished turn)."""
    from prefopt.config import ModelArgs
    from prefopt.models import load_model, load_tokenizer

    tok = train_tokenizer(task_corpus(), vocab_size=300, pad="eos")
    assert tok.pad_token_id == tok.eos_token_id
    built = tiny_model("llama", tok, seed=0)
    assert built.get_input_embeddings().padding_idx == tok.eos_token_id  # the trap, as configs build it
    save_tiny(built, tok, tmp_path / "model")
    m = ModelArgs(model_name_or_path=str(tmp_path / "model"))
    model = load_model(m, load_tokenizer(m), build_config({"output_dir": str(tmp_path), "method": "simpo"}).training,
                       log=lambda *a: None)
    assert model.get_input_embeddings().padding_idx is None
    ids = torch.tensor([[5, 6, tok.eos_token_id, 7, 8]])
    model(ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().weight.grad[tok.eos_token_id].abs().sum() > 0
