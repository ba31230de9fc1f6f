"""The tokenizer and the model of a TRL-style call: given or loaded, then made ready as prefopt's run
makes it (`models.load_model`), with a PEFT config applied where TRL applies it.

    tokenizer = tokenizer_of(model, processing_class, cfg)
    model = model_of(model, args, cfg, tokenizer, peft_config)

A model id loads through `models.load_model` (safetensors only, dtype "auto" as transformers 5
and TRL leave it, `model_init_kwargs` read as prefopt reads them); a model object is used as
given. Both then get what prefopt's run gives a model: the tokenizer's pad, BOS and EOS ids in
its configs, embeddings grown to the tokenizer, no embedding row exempt from gradients
(`padding_idx`: with pad == EOS, TRL's EOS row never trains; masks here come from lengths), and
TRL's order for the rest: the PEFT adapter, then dropout off (the adapter's too) when asked.
"""

import dataclasses

import torch
from transformers import set_seed

from ..config import Config
from ..errors import PrefoptError
from ..models import check_adapter_start, check_weights_format, fit_to_tokenizer, load_model, load_tokenizer
from ..templates import setup_chat_template


def tokenizer_of(model, processing_class, cfg: Config):
    """The given tokenizer, else the model's own (by id, or the id the loaded model came from), with a
    pad token (the EOS where it has none, as TRL)."""
    tokenizer = processing_class
    if tokenizer is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        if not name:
            raise PrefoptError("processing_class is not given and the model does not record where it came from; "
                               "pass the tokenizer as processing_class.")
        tokenizer = load_tokenizer(dataclasses.replace(cfg.model, model_name_or_path=name, tokenizer_name_or_path=None))
    setup_chat_template(tokenizer, None)  # the tokenizer's own template; a pad token where it has none
    return tokenizer


def model_of(model, args, cfg: Config, tokenizer, peft_config):
    """The model ready to train: loaded if `model` is an id, the adapter of `peft_config` added."""
    set_seed(args.seed)  # PEFT initialises its adapter at random: seeded first, as TRL does
    if isinstance(model, str):
        check_adapter_start(cfg.model, cfg.source)
        check_weights_format(cfg.model, cfg.source)
        model = load_model(dataclasses.replace(cfg.model, use_peft=False, disable_dropout=False), tokenizer, args,
                           log=lambda *a: None)
    elif not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise PrefoptError(f"model is a {type(model).__name__}; pass a transformers causal LM (PreTrainedModel) "
                           "or its Hub id / local folder.")
    else:
        fit_to_tokenizer(model, tokenizer, args)  # what load_model does after from_pretrained
    if peft_config is not None:
        model = _with_adapter(model, args, peft_config)
    elif args.activation_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # as TRL: checkpointed blocks need an input that requires grad
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def _with_adapter(model, args, peft_config):
    from peft import PeftConfig, get_peft_model
    from accelerate.utils import is_peft_model

    if not isinstance(peft_config, PeftConfig):
        raise PrefoptError(f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig), got "
                           f"{type(peft_config).__name__}.")
    if is_peft_model(model):
        raise PrefoptError("peft_config was given with a model that already is a PeftModel: merge and unload its "
                           "adapter first (prefopt merge), or pass the PeftModel without peft_config to train its "
                           "adapter further.")
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.activation_checkpointing)
        return get_peft_model(model, peft_config)
    if args.activation_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    plugin = getattr(args, "deepspeed_plugin", None)
    # as TRL: under ZeRO-3 the adapter keeps the base's dtype (ZeRO-3 gathers mixed dtypes wrongly)
    zero3 = plugin is not None and getattr(plugin, "zero_stage", None) == 3
    return get_peft_model(model, peft_config, **({"autocast_adapter_dtype": False} if zero3 else {}))
