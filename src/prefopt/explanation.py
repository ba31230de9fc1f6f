"""A resolved config, shown and saved: `explain` (what `prefopt config explain` and the start of
`train` print) and `resolved_dict` / `save_resolved` (the run's `prefopt_config.yaml`).

    print(explain(cfg))
    save_resolved(cfg, "outputs/run/prefopt_config.yaml")   # loads back to the same run

The saved form holds canonical keys only (`dialects.NON_CANONICAL` never appears in it), and of
the training arguments only those that differ from transformers' defaults or are prefopt's own.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from transformers import TrainingArguments

from .dataforms import looks_held_out
from .dialects import NON_CANONICAL
from .losses import HYPERPARAMETERS, LOSSES, Hyper, formula, takes
from .schema import TRAINING_DEFAULTS, _plain
from .templates import LAYOUTS, completion_layout, wants_empty_system
from .values import TRAINING_KEYS

if TYPE_CHECKING:
    from .config import Config


def loss_formula(cfg: Config) -> str:
    o, spec = cfg.objective, cfg.method
    pref = formula(o.method, o.loss_type, Hyper.from_objective(o))
    nll = f" + {o.nll_weight:g}·NLL({'prompt + chosen' if spec.nll_span == 'prompt+completion' else 'chosen'})" if o.nll_weight else ""
    where = LOSSES[o.loss_type].where
    return f"L = {pref}{nll}{f'  where {where}' if where else ''}"


def explain(cfg: Config, warnings: bool = False, processes: int | None = None) -> str:
    """The resolved objective, as printed by `prefopt config explain` (with `warnings`: the ones
    `train` prints after it, from the same `guidance.before_training`) and at the start of `train`.
    `processes`: the run's (train knows it); else WORLD_SIZE where a launcher set it, else 1."""
    o, spec = cfg.objective, cfg.method
    rows = [
        ("method", f"{o.method} — {spec.title} [{spec.paper}]"),
        ("loss", o.loss_type),
        ("formula", loss_formula(cfg)),
    ]
    allowed = takes(o.method, o.loss_type)
    hyper = {True: [], False: []}  # scale and margins first, then the NLL rows, then the rest
    for name, f in HYPERPARAMETERS.items():
        if name not in allowed:
            continue
        if name == "gamma_beta_ratio":  # the margin as the paper states it too
            hyper[True].append(("γ (absolute)", f"{o.gamma_beta_ratio * o.beta:g}"))
        hyper[f.metadata["main"]].append((spec.labels.get(name, f.metadata["label"]), f"{getattr(o, name):g}"))
    rows += hyper[True] + [
        ("NLL weight", f"{o.nll_weight:g}" + (f" (over {spec.nll_span})" if o.nll_weight else " (no NLL term)")),
        ("log-probs", f"{cfg.reduction} over completion tokens"),
    ] + hyper[False]
    if o.diversity_weight:
        rows.append(("diversity", f"weight {o.diversity_weight:g}, alpha {o.diversity_alpha:g}"))
    m, d, t = cfg.model, cfg.data, cfg.training
    rows += [
        ("model", m.model_name_or_path or "(built-in demo)"),
        ("train data", ", ".join(f"{s.path}[{s.split}]" for s in d.train_datasets) or "(built-in demo)"),
        ("eval data", ", ".join(f"{s.path}[{s.split}]" for s in d.eval_datasets)
         or (f"{d.test_split_size:g} of train held out" if d.test_split_size else "none")),
        ("lengths", f"max_length {d.max_length}, max_prompt_length {d.max_prompt_length}"),
        ("completion", f"{completion_layout(d)}: {LAYOUTS[d.completion_layout]}"
                       + ("; an empty system turn opens prompts without one" if wants_empty_system(d) else "")),
        ("batch", global_batch(t, processes)),
        ("learning rate", f"{t.learning_rate:g} ({_plain(t.lr_scheduler_type)}, warmup {warmup(t)})"),
        ("output_dir", t.output_dir),
        ("checkpoints", saving(cfg)),
    ]
    if m.use_peft:
        rows.append(("LoRA", f"r {m.lora_r}, alpha {m.lora_alpha}, dropout {m.lora_dropout}, "
                             f"targets {m.lora_target_modules or 'default'}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    if cfg.notes:
        lines.append("  read as:")
        lines += [f"    - {n}" for n in cfg.notes]
    if cfg.differs:  # the config relies on another tool's defaults; prefopt keeps the papers'
        lines.append("  not what its own tool would train (prefopt keeps its own defaults, the papers' for the objective):")
        lines += [f"    - {n}" for n in cfg.differs]
    if warnings:
        from .guidance import before_training  # (guidance imports config, which imports this module)

        said = before_training(cfg, _processes(processes)[0])
        lines.append("  warnings train would print:" + ("" if said else " none"))
        lines += [f"    - {w}" for w in said]
    return "\n".join(lines)


def _processes(processes: int | None) -> tuple[int, str]:
    if processes is not None:
        return processes, ""
    launched = os.environ.get("WORLD_SIZE")
    if launched and launched.isdigit():
        return int(launched), " (WORLD_SIZE)"
    return 1, " (no launcher: WORLD_SIZE unset; a launch with N processes multiplies it)"


def global_batch(t, processes: int | None = None) -> str:
    """per device × accumulation × processes = pairs per optimizer step, saying where the count of
    processes came from when the run does not know it yet."""
    n, whence = _processes(processes)
    return (f"{t.per_device_train_batch_size} per device × {t.gradient_accumulation_steps} accumulation × {n} "
            f"process{'es' * (n != 1)} = {t.per_device_train_batch_size * t.gradient_accumulation_steps * n} pairs "
            f"per optimizer step{whence}")


def warmup(t) -> str:
    """transformers 5 keeps warmup_ratio as a warmup_steps below 1: a share of the steps."""
    if 0 < t.warmup_steps < 1:
        steps = f", {math.ceil(t.max_steps * t.warmup_steps)} of max_steps {t.max_steps}" if t.max_steps > 0 else ""
        return f"{t.warmup_steps * 100:g}% of steps{steps}"
    return f"{int(t.warmup_steps)} step{'s' * (int(t.warmup_steps) != 1)}"


def saving(cfg: Config) -> str:
    """When checkpoints are written and how many are kept (save_total_limit is prefopt's 2 unless given)."""
    t = cfg.training
    strategy = _plain(t.save_strategy)
    when = {"no": "none written", "epoch": "every epoch", "best": "at each new best evaluation"}.get(
        strategy, f"every {t.save_steps:.0%} of the steps and at the end" if 0 < t.save_steps < 1
        else f"every {t.save_steps:g} steps and at the end")
    if strategy == "no":
        return when
    kept = ("every one kept" if t.save_total_limit is None else f"the newest {t.save_total_limit} kept"
            + (" (prefopt's default; transformers keeps every one: save_total_limit: null)"
               if "save_total_limit" in cfg.defaulted else ""))
    return f"{when}, {kept}" + (", without optimizer state" if t.save_only_model else "")


def resolved_dict(cfg: Config) -> dict:
    """The canonical form of the config: loading it again gives the same run."""
    out: dict = {}
    for section in (cfg.model, cfg.objective):
        out.update({k: _plain(v) for k, v in dataclasses.asdict(section).items()})
    data = dataclasses.asdict(cfg.data)
    sources = data.pop("train_datasets") + data.pop("eval_datasets")
    out.update(data)
    if sources:
        first_eval = len(sources) - len(cfg.data.eval_datasets)
        # a source whose split's name says otherwise says which it is (LLaMA-Factory's eval_dataset of split train)
        out["datasets"] = [_source(s) | ({"eval": i >= first_eval} if (i >= first_eval) != looks_held_out(s["split"])
                                         else {}) for i, s in enumerate(sources)]
    # the dataclass defaults, not a second TrainingArguments: building one sets up devices again,
    # which under torchrun takes this process out of the process group
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(TrainingArguments)}
    defaults = {k: getattr(v, "value", v) for k, v in defaults.items()}
    for k, v in cfg.training.to_dict().items():
        # (TrainingArguments still has fields under some old spellings, gradient_checkpointing)
        if k not in TRAINING_KEYS or k in NON_CANONICAL or k in cfg.forced:
            continue
        if isinstance(v, str) and v.startswith("<") and v.endswith(">"):  # a token to_dict() masked
            continue
        derived = k in DERIVED_BY_TRANSFORMERS or (not v and not defaults.get(k))  # "" vs [], None vs {}
        if k in TRAINING_DEFAULTS or (v != defaults.get(k) and not derived):
            out[k] = _plain(v)
    return out


def _source(s: dict) -> dict:
    """A DatasetSource (as a dict) as an entry of `datasets:`, its mix share under TRL's `fraction`."""
    keep = ("path", "split", "name", "data_dir", "data_files", "columns", "keep_fraction", "format")
    entry = {k: s[k] for k in keep if s[k] is not None}
    return entry | ({"fraction": s["mix_share"]} if s["mix_share"] is not None else {})


# Set by TrainingArguments itself when left unset (written back, they would pin this machine's choice)
DERIVED_BY_TRANSFORMERS = {"disable_tqdm", "accelerator_config", "logging_dir"}


def save_resolved(cfg: Config, path: str | Path):
    Path(path).write_text("# prefopt resolved config\n" + yaml.safe_dump(resolved_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Every key, for `prefopt config keys`

KEY_SECTIONS = ("model", "data", "objective", "run", "pairs", "training")


def _type_name(annotation) -> str:
    return annotation if isinstance(annotation, str) else str(annotation).replace("typing.", "").replace(
        "<class '", "").replace("'>", "")


def config_keys(section: str | None = None) -> str:
    """Every canonical key of `section` (all when None), a line each: name, type, default, help —
    the help texts of the dataclasses (prefopt's) and of TrainingArguments (transformers')."""
    from .schema import DataArgs, ModelArgs, ObjectiveArgs, PairsArgs, RunArgs

    classes = {"model": ModelArgs, "data": DataArgs, "objective": ObjectiveArgs, "run": RunArgs, "pairs": PairsArgs,
               "training": TrainingArguments}
    if section is not None and section not in classes:
        from .errors import PrefoptError

        raise PrefoptError(f"prefopt config keys: no section {section!r}; the sections are {', '.join(KEY_SECTIONS)}.")
    lines = []
    for name in [section] if section else KEY_SECTIONS:
        lines.append(f"{name}:")
        for f in dataclasses.fields(classes[name]):
            if not f.init or f.name in ("train_datasets", "eval_datasets") or name == "training" and (
                    f.name not in TRAINING_KEYS or f.name in NON_CANONICAL):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            default = TRAINING_DEFAULTS.get(f.name, default) if name == "training" else default
            shown = "required" if default is dataclasses.MISSING else repr(_plain(default))
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            lines.append(f"  {f.name}  ({_type_name(f.type)}, default {shown})" + (f"\n      {help_text}" if help_text else ""))
    return "\n".join(lines)
