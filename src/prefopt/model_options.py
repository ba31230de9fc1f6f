"""The model keys read and checked before anything loads, and what loading is given from them.

    model_init_kwargs ──► read_init_kwargs (config time): its dtype, attention, revision and remote
        code read as prefopt's keys; placement and quantization refused; the rest kept for from_pretrained
    ModelArgs ──► check_model_args (config time): dtype names, lora_task_type, what PEFT cannot combine
              ──► check_attention (on this machine): flash attention only where it can run
              ──► from_pretrained_kwargs (with the BitsAndBytesConfig), lora_config (the LoraConfig)

No transformers or peft import at module level: config reads with this module.
"""

import dataclasses

import torch

from .errors import PrefoptError
from .schema import ModelArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto",
          None: torch.float32}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # bnb_4bit_compute_dtype (None: float32)
# bnb_4bit_quant_storage (None: uint8): a float type lets FSDP/ZeRO-3 shard the packed weights with the rest
STORAGE_DTYPES = ("uint8", "float16", "bfloat16", "float32")
TARGET_PARAMETERS_PEFT = "0.17.0"  # the first peft whose LoraConfig takes target_parameters

# model_init_kwargs entries that are prefopt keys under another name, read as those keys
READ_AS = {"torch_dtype": "dtype", "dtype": "dtype", "attn_implementation": "attn_implementation",
           "revision": "model_revision", "trust_remote_code": "trust_remote_code"}
_PLACED = ("prefopt places the model itself (accelerate puts each process's copy on its device; DeepSpeed or "
           "FSDP shard it); remove it")
REFUSED = {
    "device_map": _PLACED,
    "max_memory": _PLACED,
    "quantization_config": "prefopt builds the quantization config from its own keys; remove it and use load_in_4bit "
                           "or load_in_8bit with bnb_4bit_quant_type, bnb_4bit_compute_dtype, "
                           "bnb_4bit_use_double_quant and bnb_4bit_quant_storage",
    "load_in_4bit": "set the key load_in_4bit instead",
    "load_in_8bit": "set the key load_in_8bit instead",
    "use_safetensors": "prefopt reads only safetensors unless allow_pickle_weights: true; set that key instead",
    "pretrained_model_name_or_path": "set model_name_or_path instead",
    # a secret would be written to prefopt_config.yaml, which a push uploads
    "token": "a token would be saved in prefopt_config.yaml (and pushed with it); give it as the HF_TOKEN "
             "environment variable or with `hf auth login` instead",
    "use_auth_token": "a token would be saved in prefopt_config.yaml (and pushed with it); give it as the HF_TOKEN "
                      "environment variable or with `hf auth login` instead",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelArgs)}


def _dtype_name(value):
    """A dtype as the dtype keys name it: torch.bfloat16 and "torch.bfloat16" are "bfloat16"."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value.removeprefix("torch.") if isinstance(value, str) else value


def _read_value(where: str, key: str, canonical: str, value):
    if canonical == "dtype":
        name = _dtype_name(value)
        if name not in ("auto",) + COMPUTE_DTYPES:
            raise PrefoptError(f"{where}: model_init_kwargs.{key} must be auto, float32, bfloat16 or float16, "
                               f"got {value!r}.")
        return name
    wanted = bool if canonical == "trust_remote_code" else str
    if not isinstance(value, wanted):
        raise PrefoptError(f"{where}: model_init_kwargs.{key} must be a {wanted.__name__} (it is read as "
                           f"{canonical}), got {value!r}.")
    return value


def read_init_kwargs(where: str, m: ModelArgs, notes: list[str] | None = None) -> ModelArgs:
    """`m` with TRL's `model_init_kwargs` folded in: its torch_dtype/dtype, attn_implementation,
    revision and trust_remote_code become prefopt's keys (refused when the key is set otherwise;
    a key still at its default counts as unset), device_map and quantization_config are refused,
    and what remains is kept in `model_init_kwargs` for from_pretrained. Folding twice changes nothing."""
    kwargs = m.model_init_kwargs
    if kwargs is None:
        return m
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise PrefoptError(f"{where}: model_init_kwargs must map from_pretrained argument names to values, e.g. "
                           f"{{use_cache: false}}; got {kwargs!r}.")
    if "torch_dtype" in kwargs and "dtype" in kwargs and \
            _dtype_name(kwargs["torch_dtype"]) != _dtype_name(kwargs["dtype"]):
        raise PrefoptError(f"{where}: model_init_kwargs gives torch_dtype {kwargs['torch_dtype']!r} and dtype "
                           f"{kwargs['dtype']!r}, two names of one argument; keep one.")
    for key in kwargs:
        if key in REFUSED:
            raise PrefoptError(f"{where}: model_init_kwargs.{key}: {REFUSED[key]}.")
    changes, rest = {}, {}
    for key, value in kwargs.items():
        canonical = READ_AS.get(key)
        if canonical is None:
            rest[key] = value
            continue
        value = _read_value(where, key, canonical, value)
        current = getattr(m, canonical)
        if current != _DEFAULTS[canonical] and current != value:
            raise PrefoptError(f"{where}: model_init_kwargs.{key} is {value!r} but {canonical} is {current!r}; both "
                               "set the same from_pretrained argument. Keep one.")
        changes[canonical] = value
        if notes is not None:
            notes.append(f"model_init_kwargs.{key} read as {canonical}: {value}")
    return dataclasses.replace(m, **changes, model_init_kwargs=rest or None)


def _check_dtype_key(where: str, key: str, value, names: tuple[str, ...]):
    if value is not None and value not in names:
        raise PrefoptError(f"{where}: {key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}.")


def check_model_args(where: str, m: ModelArgs):
    """Refuse, at config time, model keys that could only fail once the model loads."""
    _check_dtype_key(where, "bnb_4bit_compute_dtype", m.bnb_4bit_compute_dtype, COMPUTE_DTYPES)
    _check_dtype_key(where, "bnb_4bit_quant_storage", m.bnb_4bit_quant_storage, STORAGE_DTYPES)
    if m.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise PrefoptError(f"{where}: bnb_4bit_quant_type must be nf4 or fp4, got {m.bnb_4bit_quant_type!r}.")
    task = m.lora_task_type
    if not isinstance(task, str) or task.upper() != "CAUSAL_LM":
        from peft import TaskType

        kind = ("a PEFT task type for another kind of model" if str(task).upper() in TaskType.__members__
                else f"not a PEFT task type ({', '.join(TaskType.__members__)})")
        raise PrefoptError(f"{where}: lora_task_type {task!r} is {kind}; prefopt trains causal language models "
                           "(scored token by token through the LM head), so the adapter is always CAUSAL_LM. "
                           "Remove lora_task_type or set it to CAUSAL_LM.")
    if m.lora_target_parameters:
        _check_target_parameters(where, m)


def _check_target_parameters(where: str, m: ModelArgs):
    import peft
    from peft import LoraConfig

    if not isinstance(m.lora_target_parameters, list) or not all(isinstance(p, str) for p in m.lora_target_parameters):
        raise PrefoptError(f"{where}: lora_target_parameters must be a list of parameter names, e.g. "
                           f"[experts.gate_up_proj, experts.down_proj]; got {m.lora_target_parameters!r}.")
    if "target_parameters" not in {f.name for f in dataclasses.fields(LoraConfig)}:
        raise PrefoptError(f"{where}: lora_target_parameters needs peft >= {TARGET_PARAMETERS_PEFT} (installed: "
                           f"{peft.__version__}); upgrade peft, or adapt Linear layers only with lora_target_modules.")
    if m.use_dora:
        raise PrefoptError(f"{where}: use_dora with lora_target_parameters: PEFT's parameter targeting has no DoRA "
                           f"(peft {peft.__version__}). Remove one of them.")
    if m.lora_dropout and not m.disable_dropout:
        raise PrefoptError(f"{where}: lora_target_parameters with lora_dropout {m.lora_dropout} and disable_dropout: "
                           "false: PEFT's parameter targeting has no dropout, and the adapter's layers share one "
                           "lora_dropout. Set lora_dropout: 0.")


# attn_implementation → (transformers' availability check, what it needs)
FLASH = {
    "flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package (2.x)"),
    "flash_attention_3": ("is_flash_attn_3_available", "flash-attn 3 (flash_attn_interface)"),
    "flash_attention_4": ("is_flash_attn_4_available", "flash-attn 4"),
}


def check_attention(where: str, m: ModelArgs):
    """Refuse, before the tokenizer or the model loads, a flash attention this machine cannot run
    (transformers would stop with an ImportError at load, after the data was tokenized)."""
    if m.attn_implementation not in FLASH:
        return
    import transformers.utils

    helper, needs = FLASH[m.attn_implementation]
    if not torch.cuda.is_available():
        reason = "this machine has no CUDA GPU"
    elif not getattr(transformers.utils, helper, lambda: False)():
        reason = "it is not installed here (or does not fit this torch and GPU)"
    else:
        return
    written = " (what use_flash_attention_2: true asks for)" if m.attn_implementation == "flash_attention_2" else ""
    raise PrefoptError(f"{where}: attn_implementation {m.attn_implementation}{written} needs {needs} on a CUDA GPU, "
                       f"and {reason}. Use attn_implementation: sdpa (PyTorch's fused attention, the same "
                       "attention), or install flash-attn on a GPU machine.")


def quantization_config(m: ModelArgs):
    """The BitsAndBytesConfig of load_in_4bit / load_in_8bit and the bnb_4bit_* keys."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=m.load_in_4bit,
        load_in_8bit=m.load_in_8bit,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[m.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        bnb_4bit_quant_storage=m.bnb_4bit_quant_storage,  # a name; None is bitsandbytes' uint8
    )


def from_pretrained_kwargs(m: ModelArgs, quantize: bool) -> dict:
    """The keyword arguments of from_pretrained: model_init_kwargs' pass-through entries, then
    prefopt's own (which they cannot override: read_init_kwargs folded or refused those)."""
    m = read_init_kwargs("ModelArgs", m)  # a no-op after the config (or load_model) folded it
    kwargs = {**(m.model_init_kwargs or {}), "revision": m.model_revision, "trust_remote_code": m.trust_remote_code,
              "dtype": DTYPES[m.dtype],
              # pickle can run code when loaded: only safetensors unless the config opts in
              "use_safetensors": None if m.allow_pickle_weights else True}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if quantize and (m.load_in_4bit or m.load_in_8bit):
        kwargs["quantization_config"] = quantization_config(m)
    return kwargs


def lora_config(m: ModelArgs, trainable_tokens: dict[str, list[int]] | None):
    """The LoraConfig of the lora_* keys, use_rslora and use_dora; `trainable_tokens`: the new
    vocabulary rows to train, by embedding module name."""
    from peft import LoraConfig

    extra = {}
    dropout = m.lora_dropout
    if m.lora_target_parameters:
        extra["target_parameters"] = m.lora_target_parameters  # only then: older peft lacks the field
        # parameter targeting has no dropout; disable_dropout would set it to 0 after wrapping anyway
        dropout = 0.0 if m.disable_dropout else dropout
    return LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=dropout,
        target_modules=m.lora_target_modules,
        modules_to_save=m.lora_modules_to_save,
        trainable_token_indices=trainable_tokens or None,
        task_type="CAUSAL_LM",  # check_model_args refused any other lora_task_type
        use_rslora=m.use_rslora,
        use_dora=m.use_dora,
        **extra,
    )
