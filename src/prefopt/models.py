"""Loading the tokenizer and the model (Hub id or local folder), with LoRA/QLoRA when asked.

    model folder ──► from_pretrained (dtype, attention, 4/8-bit) ──► resize to the tokenizer
        ──► [existing adapter: continue it, or merge it in] ──► [new LoRA] ──► dropout off

A model folder that holds a LoRA adapter (`adapter_config.json`) is never trained by surprise:
`existing_adapter: continue` trains that adapter further, `existing_adapter: merge` folds it into
its base first (full precision only). When the tokenizer grew (`chat_template: chatml` on a base
model), the new rows of the embeddings (and of an untied head) are trained with the adapter, and
the resized embeddings are saved with it, so base + adapter reloads to the same model.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainingArguments
from transformers.core_model_loading import revert_weight_conversion
from transformers.integrations import is_deepspeed_zero3_enabled

from .config import ModelArgs
from .errors import PrefoptError
from .model_options import (DTYPES, check_attention, check_model_args, from_pretrained_kwargs, lora_config,
                            read_init_kwargs)

ADAPTER_CONFIG = "adapter_config.json"


def _local(name: str) -> Path | None:
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise PrefoptError(f"model folder {name!r} does not exist. Check model_name_or_path.")
    return path if looks_local else None


def _source(m: ModelArgs, tokenizer: bool = False) -> str:
    name = (m.tokenizer_name_or_path if tokenizer else None) or m.model_name_or_path
    if name is None:
        raise PrefoptError("model_name_or_path is not set: give a Hub id or a local folder.")
    local = _local(name)
    return str(local) if local else name


def read_adapter_config(name: str, revision: str | None = None) -> dict | None:
    """The adapter_config.json of an adapter folder or Hub repo; None for a full model (or a
    missing folder: loading says so)."""
    local = Path(name).expanduser()
    file = local / ADAPTER_CONFIG
    if not file.is_file():
        if name.startswith((".", "/", "~")) or local.exists():
            return None
        from transformers.utils import find_adapter_config_file

        try:  # transformers would otherwise load base + adapter from a Hub adapter id without a word
            found = find_adapter_config_file(name, revision=revision)
        except Exception:  # offline, or no such repo: loading the model reports it
            found = None
        if found is None:
            return None
        file = Path(found)
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PrefoptError(f"{file}: not valid JSON ({e}).") from None


def adapter_base(m: ModelArgs, adapter: dict, where: str) -> str:
    base = m.base_model_name_or_path or adapter.get("base_model_name_or_path")
    if not base:
        raise PrefoptError(f"{where}: the adapter in {m.model_name_or_path} does not record its base model; "
                           "set base_model_name_or_path.")
    local = Path(base).expanduser()
    if base.startswith((".", "/", "~")) and not local.is_dir():
        raise PrefoptError(f"{where}: the adapter's base model {base!r} does not exist here; set "
                           "base_model_name_or_path to where it is.")
    return str(local) if local.is_dir() else base


def check_adapter_start(m: ModelArgs, where: str):
    """Refuse, before anything loads, an adapter folder given without saying what to do with it."""
    if m.model_name_or_path is None:
        return
    adapter = read_adapter_config(m.model_name_or_path, m.model_revision)
    if m.existing_adapter not in (None, "continue", "merge"):
        raise PrefoptError(f"{where}: existing_adapter must be continue or merge, got {m.existing_adapter!r}.")
    if adapter is None:
        if m.existing_adapter:
            raise PrefoptError(f"{where}: existing_adapter: {m.existing_adapter} but {m.model_name_or_path} holds no "
                               f"{ADAPTER_CONFIG}; remove existing_adapter, or point model_name_or_path at an adapter.")
        return
    if adapter.get("peft_type", "LORA") != "LORA":
        raise PrefoptError(f"{where}: {m.model_name_or_path} holds a {adapter.get('peft_type')} adapter; only LoRA "
                           "adapters can be continued or merged.")
    if m.existing_adapter is None:
        raise PrefoptError(
            f"{where}: {m.model_name_or_path} is a LoRA adapter, not a full model. Say what to do with it: "
            "existing_adapter: continue (train this adapter further; the lora_* settings are those it was saved "
            "with), or existing_adapter: merge (fold it into its base, then train as configured). "
            f"`prefopt merge {m.model_name_or_path} --output DIR` writes the merged model once."
        )
    if m.existing_adapter == "merge" and m.use_peft:
        raise PrefoptError(
            f"{where}: existing_adapter: merge with use_peft: the new adapter would be saved against a merged base "
            f"that exists nowhere on disk. Merge first (`prefopt merge {m.model_name_or_path} --output DIR`) and "
            "train the new LoRA on DIR, or set use_peft: false to fine-tune the merged model in full."
        )
    if m.existing_adapter == "merge" and (m.load_in_4bit or m.load_in_8bit):
        raise PrefoptError(
            f"{where}: existing_adapter: merge with {'load_in_4bit' if m.load_in_4bit else 'load_in_8bit'}: an "
            "adapter cannot be merged exactly into a quantised base. Merge in full precision first "
            f"(`prefopt merge {m.model_name_or_path} --output DIR`), then train on DIR with load_in_4bit, "
            "or use existing_adapter: continue."
        )
    adapter_base(m, adapter, where)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weights_format(m: ModelArgs, where: str):
    """Refuse, before loading, a local model folder whose weights exist only as pickle, or whose
    safetensors files are damaged."""
    if m.model_name_or_path is None:
        return
    local = Path(m.model_name_or_path).expanduser()
    check_weights_intact(local, where)
    if m.allow_pickle_weights:
        return
    adapter = read_adapter_config(m.model_name_or_path) if local.is_dir() else None
    if adapter is not None:
        base = Path(m.base_model_name_or_path or adapter.get("base_model_name_or_path") or "").expanduser()
        folders = [local] + ([base] if base.is_dir() else [])
    else:
        folders = [local] if local.is_dir() else []
    for folder in folders:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)
                         if p.name != "training_args.bin")
        if pickles and not any(folder.glob("*.safetensors")):
            raise PrefoptError(
                f"{where}: {folder} holds its weights only as pickle ({', '.join(pickles[:3])}), which can run code "
                "when loaded. Convert them to safetensors (save_pretrained writes safetensors), or set "
                "allow_pickle_weights: true if you trust where the files came from."
            )


def load_tokenizer(m: ModelArgs):
    name = _source(m, tokenizer=True)
    local = Path(name)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise PrefoptError(f"{name} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}). Copy the tokenizer "
                           "into it (tokenizer.save_pretrained), or set tokenizer_name_or_path to where it is.")
    try:
        return AutoTokenizer.from_pretrained(name, revision=m.model_revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"could not load the tokenizer from {name!r}: {str(e).splitlines()[0]} Set "
                           "tokenizer_name_or_path to a folder or Hub id that holds it.") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "vocab.txt")


def check_weights_intact(folder: str | Path, where: str):
    """Refuse, before loading, a safetensors file that is cut short or has a damaged header (a copy
    that ran out of disk, an interrupted download): its header says where every tensor ends."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        problem = None
        try:
            with path.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
                header = json.loads(fh.read(n)) if 0 < n <= min(size - 8, 100_000_000) else None
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError):
            header = None
        if header is None:
            problem = "its header is missing or damaged"
        else:
            if 8 + n + end > size:
                problem = f"it is cut short ({size:,} bytes; its header describes {8 + n + end:,})"
        if problem:
            raise PrefoptError(f"{where}: {path}: {problem}. Copy or download it again.")


def _from_pretrained(name: str, m: ModelArgs, quantize: bool) -> PreTrainedModel:
    kwargs = from_pretrained_kwargs(m, quantize)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if "safetensors" in str(e) and not m.allow_pickle_weights:
            raise PrefoptError(f"{name}: no safetensors weights found; only pickle files (.bin), which can run code "
                               "when loaded. Use a safetensors copy, or set allow_pickle_weights: true if you trust "
                               "the source.") from None
        raise PrefoptError(f"could not load the model from {name!r}: {e}") from None
    except TypeError as e:  # an argument the model's constructor does not take
        passed = sorted(read_init_kwargs(name, m).model_init_kwargs or {})
        if not passed:
            raise
        raise PrefoptError(f"model_init_kwargs {passed}: from_pretrained of {name!r} failed with them: "
                           f"{str(e).splitlines()[0]}. Remove the argument it names.") from None


def resize_to(model: PreTrainedModel, tokenizer) -> list[int]:
    """Grow the embeddings to cover every token of `tokenizer`; the ids of the new rows."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local shape is empty
    if len(tokenizer) <= rows:
        return []
    # e.g. `chat_template: chatml` added <|im_start|>/<|im_end|> to a base model's vocabulary
    model.resize_token_embeddings(len(tokenizer))
    return list(range(rows, len(tokenizer)))


def fit_to_tokenizer(model: PreTrainedModel, tokenizer, t: TrainingArguments) -> list[int]:
    """A loaded model made to match `tokenizer` and `t`: embeddings grown to the tokenizer, no embedding
    row exempt from gradients, the tokenizer's pad, EOS and BOS ids in its configs, and no KV cache under
    activation checkpointing. The ids of the rows added (see `resize_to`)."""
    new_ids = resize_to(model, tokenizer)
    embeddings = model.get_input_embeddings()
    if getattr(embeddings, "padding_idx", None) is not None:
        # A config's pad id becomes the embedding's padding_idx, whose row never gets a gradient: with
        # pad == eos, EOS would never train. Padding is masked by length here, so no row is special.
        embeddings.padding_idx = None
    for cfg in (model.config.get_text_config(), model.generation_config):
        if cfg is None:  # a model built in code (not from_pretrained) may have no generation config
            continue
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    if t.activation_checkpointing:
        model.config.use_cache = False
    return new_ids


def load_model(m: ModelArgs, tokenizer, t: TrainingArguments, log=print) -> PreTrainedModel:
    """The causal LM, resized to the tokenizer, LoRA-wrapped (if asked), dropout off (if asked)."""
    name = _source(m)
    m = read_init_kwargs(name, m)  # as the config does; here for a ModelArgs built in code
    check_model_args(name, m)
    check_attention(name, m)
    adapter = read_adapter_config(name, m.model_revision)
    merging = adapter is not None and m.existing_adapter == "merge"
    model = _from_pretrained(adapter_base(m, adapter, name) if adapter else name, m, quantize=not merging)
    new_ids = fit_to_tokenizer(model, tokenizer, t)
    quantized = m.load_in_4bit or m.load_in_8bit
    if quantized:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and head, frozen base; the Trainer turns activation checkpointing on itself
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter is not None:
        from peft import PeftModel

        if merging:
            model = PeftModel.from_pretrained(model, name).merge_and_unload()
            model.requires_grad_(True)  # loading the adapter froze the base; all of it trains now
            log(f"prefopt: merged the adapter in {name} into its base")
        else:
            model = PeftModel.from_pretrained(model, name, is_trainable=True)
            log(f"prefopt: continuing to train the adapter in {name} (the lora_* settings are its own)")
    if m.use_peft and not (adapter is not None and not merging):
        model = _add_lora(model, m, new_ids)
    if m.disable_dropout:
        # after LoRA is added, so lora_dropout is switched off too (as TRL does with disable_dropout)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def _embedding_names(model) -> tuple[str, str | None]:
    """Module names of the input embeddings and (when not tied to them) the output head."""
    names = {module: name for name, module in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is None or out.weight is inp.weight
    return names[inp], None if tied else names[out]


def _add_lora(model, m: ModelArgs, new_ids: list[int]):
    from peft import get_peft_model

    trainable_tokens = None
    if new_ids:
        # Rows added for new tokens start untrained: train just those rows (not the whole matrix).
        # A tied head shares the input rows; an untied one gets its own.
        emb, head = _embedding_names(model)
        saved = set(m.lora_modules_to_save or [])
        trainable_tokens = {n: new_ids for n in (emb, head) if n and n.rsplit(".", 1)[-1] not in saved}
        if trainable_tokens and is_deepspeed_zero3_enabled():
            names = [n.rsplit(".", 1)[-1] for n in trainable_tokens]
            raise PrefoptError(
                f"the tokenizer adds {len(new_ids)} tokens to the vocabulary, and under DeepSpeed ZeRO-3 their rows "
                f"cannot be trained alone (PEFT trainable tokens read the partitioned weight). Train those modules in "
                f"full with lora_modules_to_save: {names}, or add the tokens without ZeRO-3."
            )
    lora = lora_config(m, trainable_tokens)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        if m.lora_target_parameters and "target_parameters" in str(e):
            free = ", ".join(_free_parameters(model))
            raise PrefoptError(f"lora_target_parameters {m.lora_target_parameters}: not in this model. Its "
                               f"parameters outside Linear layers are named {free}.") from None
        if "not found in the base model" not in str(e) and "Target modules" not in str(e):
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise PrefoptError(f"lora_target_modules {m.lora_target_modules}: not in this model. Its linear layers are "
                           f"named {', '.join(linear)}.") from None


def _free_parameters(model) -> list[str]:
    """Names (module.parameter) of the matrices held outside Linear and Embedding layers, such as
    MoE experts: what lora_target_parameters can name."""
    plain = (torch.nn.Linear, torch.nn.Embedding)
    return sorted({f"{mn.rsplit('.', 1)[-1]}.{pn}" for mn, mod in model.named_modules() if not isinstance(mod, plain)
                   for pn, p in mod.named_parameters(recurse=False) if p.dim() >= 2}) or ["(none)"]


# -- saved models --------------------------------------------------------------------------------

def _saved_shapes(path: Path, adapter: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in the weight files this kind of save writes (not any stray .safetensors)."""
    from safetensors import safe_open

    if adapter:
        files = [path / "adapter_model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted({path / name for name in index.get("weight_map", {}).values()})
    else:
        files = [path / "model.safetensors"]
    shapes = {}
    for file in files:
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


@contextmanager
def _no_zero3_init():
    """Build a model plainly even inside a ZeRO-3 run (only the main process checks the saved model;
    ZeRO-3's partitioned construction would wait for the others forever)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def check_saved(path: str | Path, trust_remote_code: bool = False, adapter: bool | None = None) -> int:
    """Fail loudly unless `path` holds complete weights; the number of parameters saved.

    A full model is compared, tensor by tensor, with the shapes its own config.json implies (built
    on the meta device, so nothing is allocated); an adapter must hold non-empty LoRA tensors. This
    catches what sharded training can leave behind: empty ZeRO-3 placeholders, FSDP shards, or
    missing files.
    """
    path = Path(path)
    if adapter is None:
        adapter = (path / ADAPTER_CONFIG).is_file()
    shapes = _saved_shapes(path, adapter)
    fix = ("Under DeepSpeed ZeRO-3 set zero3_save_16bit_model: true (accelerate config) or "
           "stage3_gather_16bit_weights_on_model_save: true (DeepSpeed JSON); under FSDP the final save must "
           "gather a full state dict.")
    if not shapes:
        raise PrefoptError(f"{path}: no .safetensors weights were written. {fix}")
    empty = [k for k, s in shapes.items() if 0 in s]
    if adapter:
        lora = [k for k in shapes if "lora_" in k or "trainable_tokens" in k]
        if empty or not lora:
            raise PrefoptError(f"{path}: the saved adapter is incomplete ({len(empty)} empty tensors, "
                               f"{len(lora)} LoRA tensors). {fix}")
        return sum(int(torch.Size(s).numel()) for s in shapes.values())

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"), _no_zero3_init():
        reference = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # the names and shapes save_pretrained writes: MoE experts, for one, are stored per expert
    tensors = revert_weight_conversion(reference, dict(reference.state_dict(keep_vars=True)))
    groups: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(id(tensor), []).append(name)  # tied weights are one tensor, saved once
    expected = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    problems = [f"{k}: saved empty" for k in empty]
    for names in groups.values():
        present = [n for n in names if n in shapes]
        if not present:
            problems.append(f"{names[0]}: missing")
        for n in present:
            if shapes[n] != expected[n]:
                problems.append(f"{n}: saved {list(shapes[n])}, the config implies {list(expected[n])}")
    problems += [f"{n}: saved but not in the model" for n in shapes if n not in expected]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PrefoptError(f"{path}: the saved model is incomplete or inconsistent: {shown}. {fix}")
    return reference.num_parameters()


def merge_adapter(adapter_dir: str, output: str, base: str | None = None, dtype: str | None = None,
                  log=print) -> Path:
    """Fold the LoRA adapter in `adapter_dir` into its base and save a full model to `output`."""
    if dtype not in DTYPES:
        raise PrefoptError(f"prefopt merge: --dtype must be float32, bfloat16, float16 or auto, got {dtype!r}.")
    # default: the dtype the base is stored in
    m = ModelArgs(model_name_or_path=adapter_dir, base_model_name_or_path=base, dtype=dtype or "auto",
                  existing_adapter="merge")
    if read_adapter_config(adapter_dir) is None:
        raise PrefoptError(f"prefopt merge: {adapter_dir} holds no {ADAPTER_CONFIG}; name a folder a LoRA "
                           "run saved (its output_dir or a checkpoint-N inside it).")
    check_adapter_start(m, "prefopt merge")
    base_name = adapter_base(m, read_adapter_config(adapter_dir), "prefopt merge")
    try:
        quantized = getattr(AutoConfig.from_pretrained(base_name), "quantization_config", None)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"prefopt merge: cannot read the base model's config at {base_name!r}: {e}. "
                           "Give the base with --base.") from None
    if quantized:
        raise PrefoptError(
            f"prefopt merge: the base {base_name} is stored quantised ({quantized.get('quant_method', 'quantised')}); "
            "merging into quantised weights is not exact. Give the full-precision base with --base."
        )
    out = Path(output)
    if out.resolve() == Path(adapter_dir).resolve():
        raise PrefoptError("prefopt merge: --output must differ from the adapter folder.")
    has_tokenizer = any((Path(adapter_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(m if has_tokenizer else ModelArgs(model_name_or_path=base_name))
    model = _from_pretrained(base_name, m, quantize=False)
    resize_to(model, tokenizer)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation = Path(adapter_dir) / "generation_config.json"
    if generation.is_file():
        (out / "generation_config.json").write_text(generation.read_text())
    n = check_saved(out)
    log(f"prefopt: merged {adapter_dir} into {base_name}: {n:,} parameters in {out}")
    return out
