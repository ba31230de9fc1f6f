"""One training run, top to bottom: config → data → model → Trainer → saved model and reports.

    prefopt train configs/simpo-llama.yaml --output_dir runs/a

Data is loaded, checked and tokenized before any weights load, so a bad row costs seconds,
not the minutes of loading a 7B model.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from . import data as data_mod
from .collate import collator_for
from .config import Config, explain, save_resolved
from .models import check_runnable, load_model, load_tokenizer
from .trainer import MetricsFile, PreferenceTrainer


@dataclass
class RunResult:
    output_dir: Path
    train_metrics: dict
    eval_metrics: dict | None
    trainer: PreferenceTrainer


def build_trainer(cfg: Config, model, tokenizer, prepared) -> PreferenceTrainer:
    collator = collator_for(cfg, tokenizer.pad_token_id)
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
    t = cfg.training
    out = Path(t.output_dir)
    where = cfg.source or "config"
    check_runnable(cfg.model, t, where)
    log("prefopt: resolved objective\n" + explain(cfg))

    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    data_mod.setup_chat_template(tokenizer, cfg.data.chat_template)
    prepared = data_mod.prepare(cfg, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "prefopt_config.yaml")
    data_mod.write_report(prepared.report, out)
    log(data_mod.format_report(prepared.report))

    model = load_model(cfg.model, tokenizer, t)
    trainer = build_trainer(cfg, model, tokenizer, prepared)
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
    log(f"prefopt: trained {result.global_step} steps in {time.time() - start:.0f}s; "
        f"model, tokenizer and metrics.jsonl in {out}")
    return RunResult(out, result.metrics, eval_metrics, trainer)
