"""One training run, top to bottom: config → data → model → Trainer → saved model and reports.

    prefopt train configs/simpo-llama.yaml --output_dir runs/a

Data is loaded, checked and tokenized before any weights load, so a bad row costs seconds,
not the minutes of loading a 7B model.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed
from transformers.integrations import get_available_reporting_integrations

from . import data as data_mod
from .collate import choose_layout, collator_for
from .config import Config, explain, save_resolved
from .errors import PrefoptError
from .models import check_adapter_start, check_saved, load_model, load_tokenizer
from .trainer import MetricsFile, PreferenceTrainer


@dataclass
class RunResult:
    output_dir: Path
    train_metrics: dict
    eval_metrics: dict | None
    trainer: PreferenceTrainer


def check_runnable(cfg: Config):
    """Refuse, before anything loads, what this machine or this version cannot do."""
    m, t, where = cfg.model, cfg.training, cfg.source or "config"
    cuda = torch.cuda.is_available()
    check_adapter_start(m, where)
    if (m.load_in_4bit or m.load_in_8bit) and not cuda:
        bits = "load_in_4bit" if m.load_in_4bit else "load_in_8bit"
        raise PrefoptError(
            f"{where}: {bits} needs bitsandbytes on a CUDA GPU, and this machine has none. "
            f"Set {bits}: false (LoRA still works in full precision with use_peft: true), or run on a GPU."
        )
    optim = str(getattr(t.optim, "value", t.optim))
    if ("8bit" in optim or "paged" in optim) and not cuda:
        raise PrefoptError(
            f"{where}: optim {optim} needs bitsandbytes on a CUDA GPU, and this machine has none. "
            "Use optim: adamw_torch, or run on a GPU."
        )
    if m.attn_implementation == "flex_attention" and not cuda:
        raise PrefoptError(f"{where}: attn_implementation flex_attention has no backward pass on the CPU in this "
                           "torch; use sdpa (or eager) here, flex_attention on a CUDA GPU.")
    plugin = getattr(t, "deepspeed_plugin", None)
    zero = (plugin.deepspeed_config.get("zero_optimization") or {}) if plugin is not None else {}
    if zero.get("stage") == 3 and str(zero.get("stage3_gather_16bit_weights_on_model_save")).lower() != "true":
        raise PrefoptError(f"{where}: DeepSpeed ZeRO-3 without zero3_save_16bit_model: true (accelerate config) "
                           "would save the final model as empty shards; set it to true.")
    missing = [r for r in t.report_to if r not in ("none", "all") and r not in get_available_reporting_integrations()]
    if missing:
        raise PrefoptError(f"{where}: report_to {', '.join(missing)}: not installed. Install it "
                           f"(pip install {' '.join(missing)}) or set report_to: none.")
    if cfg.objective.diversity_weight:
        # never train with a term silently left out of the loss
        raise PrefoptError(f"{where}: diversity_weight {cfg.objective.diversity_weight:g}: the diversity term is "
                           "not implemented in this version of prefopt. Set diversity_weight: 0 to train without it.")


def build_trainer(cfg: Config, model, tokenizer, prepared, log=print) -> PreferenceTrainer:
    config = model.config
    router_aux = bool(getattr(config.get_text_config(), "output_router_logits", False))
    layout, why = choose_layout(cfg.data.layout, config, config._attn_implementation, router_aux)
    if why:
        log(f"prefopt: {why}")
    collator = collator_for(cfg, tokenizer.pad_token_id, layout, config._attn_implementation)
    return PreferenceTrainer(
        model=model,
        args=cfg.training,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[MetricsFile(Path(cfg.training.output_dir) / "metrics.jsonl")],
        objective=cfg.objective,
    )


def train(cfg: Config, log=print) -> RunResult:
    """Train as `cfg` says. Under torchrun/accelerate/deepspeed every process runs this; only the
    first one prints and writes the run's files, and it tokenizes before the others read its cache."""
    t = cfg.training
    out = Path(t.output_dir)
    main_process = t.process_index == 0
    log = log if main_process else (lambda *args: None)
    check_runnable(cfg)
    log("prefopt: resolved objective\n" + explain(cfg))

    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    data_mod.setup_chat_template(tokenizer, cfg.data.chat_template)
    with t.main_process_first(desc="tokenizing"):
        prepared = data_mod.prepare(cfg, tokenizer)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "prefopt_config.yaml")
        data_mod.write_report(prepared.report, out)
    log(data_mod.format_report(prepared.report))

    model = load_model(cfg.model, tokenizer, t, log)
    trainer = build_trainer(cfg, model, tokenizer, prepared, log)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=t.resume_from_checkpoint)
    eval_metrics = None
    if prepared.eval is not None:
        # the schedule may already have evaluated at the final step; don't do it twice
        done = [line for line in trainer.state.log_history
                if "eval_loss" in line and line["step"] == result.global_step]
        eval_metrics = done[0] if done else trainer.evaluate()
    trainer.save_model(t.output_dir)
    if trainer.is_world_process_zero():
        model.generation_config.save_pretrained(t.output_dir)
        n = check_saved(t.output_dir, cfg.model.trust_remote_code)
        log(f"prefopt: saved model checked: {n:,} parameters, every tensor present with its full shape")
    trainer.accelerator.wait_for_everyone()
    log(f"prefopt: trained {result.global_step} steps in {time.time() - start:.0f}s; "
        f"model, tokenizer and metrics.jsonl in {out}")
    return RunResult(out, result.metrics, eval_metrics, trainer)
