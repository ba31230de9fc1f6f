"""Loading the tokenizer and the model (Hub id or local folder), with LoRA/QLoRA when asked."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainingArguments

from .config import ModelArgs
from .errors import PrefoptError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto", None: torch.float32}


def _source(m: ModelArgs, tokenizer: bool = False) -> str:
    name = (m.tokenizer_name_or_path if tokenizer else None) or m.model_name_or_path
    if name is None:
        raise PrefoptError("model_name_or_path is not set: give a Hub id or a local folder.")
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise PrefoptError(f"model folder {name!r} does not exist. Check model_name_or_path.")
    return str(Path(name).expanduser()) if looks_local else name


def load_tokenizer(m: ModelArgs):
    name = _source(m, tokenizer=True)
    try:
        return AutoTokenizer.from_pretrained(name, revision=m.model_revision, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        raise PrefoptError(f"could not load the tokenizer from {name!r}: {e}") from None


def load_model(m: ModelArgs, tokenizer, t: TrainingArguments) -> PreTrainedModel:
    """The causal LM, resized to the tokenizer, dropout off (if asked), LoRA-wrapped (if asked)."""
    name = _source(m)
    kwargs = {"revision": m.model_revision, "trust_remote_code": m.trust_remote_code, "dtype": DTYPES[m.dtype]}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.load_in_4bit or m.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=m.load_in_4bit,
            load_in_8bit=m.load_in_8bit,
            bnb_4bit_quant_type=m.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=DTYPES[m.bnb_4bit_compute_dtype],
            bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise PrefoptError(f"could not load the model from {name!r}: {e}") from None

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # e.g. `chat_template: chatml` added <|im_start|>/<|im_end|> to a base model's vocabulary
        model.resize_token_embeddings(len(tokenizer))
    for cfg in (model.config.get_text_config(), model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    if m.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if t.gradient_checkpointing:
        model.config.use_cache = False
    if m.use_peft:
        model = _add_lora(model, m, t)
    return model


def _add_lora(model, m: ModelArgs, t: TrainingArguments):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if m.load_in_4bit or m.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.gradient_checkpointing,
            gradient_checkpointing_kwargs=t.gradient_checkpointing_kwargs,
        )
    elif t.gradient_checkpointing:
        # frozen embeddings give checkpointed blocks inputs without grad; their adapters would get none
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=m.lora_target_modules,
        modules_to_save=m.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
