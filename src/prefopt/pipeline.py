"""One training run, top to bottom: config → data → model → Trainer → saved model and reports.

    prefopt train configs/simpo-llama3-8b-instruct.yaml --output_dir runs/a

Data is loaded, checked and tokenized before any weights load, so a bad row costs seconds,
not the minutes of loading a 7B model.
"""

import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate.utils import DistributedType
from transformers import set_seed
from transformers.integrations import get_available_reporting_integrations

from . import checkpoints, console, disk, evalgen, hub, manifest, modelcard, provenance, runs
from . import data as data_mod
from .config import Config, explain, save_resolved
from .errors import PrefoptError, Stopped
from .guidance import GuidanceCallback, before_training
from .model_options import check_attention
from .models import check_adapter_start, check_saved, check_weights_format, load_model, load_tokenizer
from .plots import plot_run
from .stopping import StopOnSignal, StopRequest
from .trainer import MetricsFile, PreferenceTrainer, collator_for_model


@dataclass
class RunResult:
    output_dir: Path
    train_metrics: dict
    eval_metrics: dict | None
    trainer: PreferenceTrainer | None
    finished: bool = False  # the folder held a finished run: nothing was done


def check_runnable(cfg: Config):
    """Refuse, before anything loads, what this machine or this version cannot do."""
    m, t, where = cfg.model, cfg.training, cfg.source or "config"
    cuda = torch.cuda.is_available()
    evalgen.check(cfg, where)
    check_adapter_start(m, where)
    check_weights_format(m, where)
    check_attention(where, m)
    if t.save_on_each_node:
        raise PrefoptError(
            f"{where}: save_on_each_node: transformers {transformers.__version__} writes a checkpoint's model weights "
            "from the first process only, so the other nodes' copies would hold none and could not be resumed from. "
            "Remove save_on_each_node and put output_dir on a file system every node shares."
        )
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
    if sharding_asked_for(t) == DistributedType.FSDP and not cuda:
        raise PrefoptError(f"{where}: FSDP runs on CUDA GPUs only, and this machine has none. On CPU processes "
                           "use DDP (torchrun --nproc_per_node N -m prefopt train ...) or DeepSpeed.")
    plugin = getattr(t, "deepspeed_plugin", None)
    zero = (plugin.deepspeed_config.get("zero_optimization") or {}) if plugin is not None else {}
    if zero.get("stage") == 3 and str(zero.get("stage3_gather_16bit_weights_on_model_save")).lower() != "true":
        raise PrefoptError(f"{where}: DeepSpeed ZeRO-3 would save the final model as empty shards: set "
                           "zero3_save_16bit_model: true (accelerate config) or "
                           "stage3_gather_16bit_weights_on_model_save: true (zero_optimization in the DeepSpeed JSON).")
    if zero.get("stage") == 3 and m.existing_adapter == "merge":
        raise PrefoptError(f"{where}: existing_adapter: merge under DeepSpeed ZeRO-3: the base is partitioned as it "
                           f"loads and cannot take the merge. Merge once first (`prefopt merge {m.model_name_or_path} "
                           "--output DIR`), then train on DIR.")
    missing = [r for r in t.report_to if r not in ("none", "all") and r not in get_available_reporting_integrations()]
    if missing:
        raise PrefoptError(f"{where}: report_to {', '.join(missing)}: not installed. Install it "
                           f"(pip install {' '.join(missing)}) or set report_to: none.")


def sharding_asked_for(t) -> DistributedType | None:
    """DeepSpeed or FSDP, if the config (`deepspeed:`, `fsdp:`) or an accelerate launch asked for it."""
    env = lambda name: os.environ.get(name, "").lower() == "true"  # noqa: E731
    if t.deepspeed or env("ACCELERATE_USE_DEEPSPEED"):
        return DistributedType.DEEPSPEED
    if t.fsdp or env("ACCELERATE_USE_FSDP"):
        return DistributedType.FSDP
    return None


def describe_processes(trainer, cfg: Config) -> str:
    """How the run is spread over processes, after refusing a silent fallback: accelerate runs
    DeepSpeed only on GPU or CPU process groups it set up, and FSDP only on GPUs; elsewhere it
    quietly trains without them."""
    t, acc = cfg.training, trainer.accelerator
    kind = acc.distributed_type
    wanted = sharding_asked_for(t)
    if wanted is not None and kind != wanted:
        raise PrefoptError(
            f"{cfg.source or 'config'}: {wanted.value} was asked for, but this run would train with "
            f"{kind.value} instead. " + ("FSDP runs on CUDA GPUs only; on CPU processes use DDP (torchrun) or "
                                         "DeepSpeed." if wanted == DistributedType.FSDP else
                                         "Launch with accelerate launch, deepspeed or torchrun.")
        )
    n = acc.num_processes
    if kind == DistributedType.DEEPSPEED:
        stage = (acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}).get("stage", 0)
        how = f"DeepSpeed ZeRO-{stage}"
    elif kind == DistributedType.FSDP:
        plugin = acc.state.fsdp_plugin
        how = f"FSDP{getattr(plugin, 'fsdp_version', 1)}, {str(plugin.state_dict_type).rsplit('.', 1)[-1]} checkpoints"
    elif n > 1:
        how = "DDP"
    else:
        return f"1 process on {t.device}"
    return f"{n} processes on {acc.device.type}, {how}"


def build_trainer(cfg: Config, model, tokenizer, prepared, log=print) -> PreferenceTrainer:
    collator = collator_for_model(cfg, model, tokenizer, log)
    trainer = PreferenceTrainer(
        model=model,
        args=cfg.training,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[MetricsFile(Path(cfg.training.output_dir) / "metrics.jsonl"),
                   GuidanceCallback(lambda message: log(f"prefopt: warning: {message}"))],
        objective=cfg.objective,
        log=log,
    )
    if cfg.run.generate_during_eval and prepared.eval is not None:  # (without eval data: refused in check_runnable)
        trainer.add_callback(evalgen.EvalGenerations(trainer, prepared.eval, tokenizer, cfg.run, cfg.data))
    console.install(trainer, nll=bool(trainer.step_objective.nll_weight))
    return trainer


def _on_main(fn, main_process: bool):
    """Run `fn` on the first process only and give its result to every process; if it fails, every
    process stops (the first with the error itself, the others quietly), none waits for it."""
    result, failure = None, None
    if main_process:
        try:
            result = ("ok", fn())
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
            result, failure = ("error", str(e)), e
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if failure is not None:
        raise failure
    if result[0] == "error":
        raise PrefoptError(result[1], echo=False)
    return result[1]


def check_shared(out: Path, t):
    """Every process writes its own part of each checkpoint into output_dir (its RNG state; under
    ZeRO its shards) and reads all of it back to resume, so output_dir must be one folder that every
    node sees. On each node's own disk the other nodes' copies would hold only their part, and a
    resume (on other nodes, after a requeue) could not continue the run: refuse before any work."""
    if t.world_size == 1 or t.save_strategy == "no":
        return
    seen = [None] * t.world_size
    torch.distributed.all_gather_object(seen, (socket.gethostname(), (out / manifest.LOCK).is_file()))
    blind = [f"process {rank} on {host}" for rank, (host, sees) in enumerate(seen) if not sees]
    if blind:
        raise PrefoptError(
            f"output_dir {out} is not one folder that every node sees: {', '.join(blind)} cannot see the run the "
            "first process started there (it is on each node's own disk), so its checkpoints could not be resumed. "
            "Put output_dir on a file system every node shares (such as /scratch), or set save_strategy: no.",
            echo=t.process_index == 0,
        )


def train(cfg: Config, log=print) -> RunResult:
    """Train as `cfg` says. Under torchrun/accelerate/deepspeed every process runs this; only the
    first one prints and writes the run's files, and it tokenizes before the others read its cache.

    The output_dir is locked, read and judged before anything loads (a finished run ends here,
    untouched); it is changed only once the data is known to be good."""
    t = cfg.training
    out = Path(t.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != t.world_size:  # also starts the process group, so process_index below is right
        raise PrefoptError(f"started as {launched} processes, but they did not join one training run "
                           f"(world size {t.world_size}); each would train alone. Check the launcher's settings.")
    main_process = t.process_index == 0
    log = log if main_process else (lambda *args: None)
    console.quiet_deepspeed(bool(t.deepspeed or getattr(t, "deepspeed_plugin", None)
                                 or sharding_asked_for(t) == DistributedType.DEEPSPEED), t.device.type)
    check_runnable(cfg)
    if (t.deepspeed or getattr(t, "deepspeed_plugin", None)) and not torch.cuda.is_available():
        # accelerate leaves DeepSpeed's own process group to CUDA setups; on CPU processes it is gloo
        import deepspeed

        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", "29500")):
            os.environ.setdefault(name, value)  # a single process started without a launcher
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    runs.check_place(cfg)
    stop = StopRequest(speak=main_process)
    stop.install()
    lock = runs.Lock(out)
    push = t.push_to_hub  # the Trainer's own push is turned off for the run (_train); put back at its end
    try:
        _on_main(lock.acquire, main_process)  # held until the run ends (or its process does)
        check_shared(out, t)
        plan = _on_main(lambda: runs.plan(cfg), main_process)
        if plan.finished:
            log(finished_message(out, plan.finished_step))
            return RunResult(out, {}, None, None, finished=True)
        disk.keep_run_limit(cfg, plan, log)
        with console.library_bars(console.is_terminal(), console.weights_bytes(cfg.model.model_name_or_path)):
            return _train(cfg, plan, lock, stop, main_process, log)
    except Exception as e:
        if not runs.is_file_system_error(e):
            raise
        complete = checkpoints.complete_checkpoints(out)
        raise runs.file_system_error(e, out, "write the run's files", str(complete[-1]) if complete else None
                                     ) from None
    finally:
        t.push_to_hub = push
        stop.uninstall()
        lock.release()


def _train(cfg: Config, plan: runs.Plan, lock: runs.Lock, stop: StopRequest, main_process: bool, log) -> RunResult:
    t = cfg.training
    out = Path(t.output_dir)
    log("prefopt: resolved objective\n" + explain(cfg, processes=t.world_size))
    for warning in before_training(cfg, t.world_size):
        log(f"prefopt: warning: {warning}")

    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    with t.main_process_first(desc="tokenizing"):
        prepared = data_mod.prepare(cfg, tokenizer)

    def commit():  # the first change to output_dir: the data is good and the plan stands
        runs.commit(plan, manifest.data_fingerprint(cfg, prepared), t.world_size, log)
        if lock.unsupported:
            log(f"prefopt: warning: {out}'s file system does not lock files ({lock.unsupported}): a second run "
                "started on this output_dir at the same time would not be stopped.")
        lock.record_holder()
        save_resolved(cfg, out / manifest.CONFIG_FILE)
        data_mod.write_report(prepared.report, out)
        provenance.record(out, provenance.collect(cfg, tokenizer), resumed=not plan.fresh, log=log)

    _on_main(commit, main_process)
    log(data_mod.format_report(prepared.report))

    with console.peft_quietly():
        model = load_model(cfg.model, tokenizer, t, log)
    for warning in _on_main(lambda: check_disk(cfg, plan, model, tokenizer, len(prepared.train)), main_process):
        log(f"prefopt: warning: {warning}")
    # prefopt pushes once, at the end (hub.py): the Trainer's push would create the repository now,
    # upload every checkpoint and replace README.md with transformers' card
    push, t.push_to_hub = t.push_to_hub, False
    trainer = build_trainer(cfg, model, tokenizer, prepared, log)
    trainer.add_callback(StopOnSignal(stop, trainer))
    log(f"prefopt: {describe_processes(trainer, cfg)}")
    start = time.time()
    if plan.resume:
        trainer.restore(plan.resume)
    result = trainer.train(resume_from_checkpoint=plan.resume)
    if trainer.stop_at_step is not None:
        raise _stopped(stop.signum, trainer.state.global_step, out)
    eval_metrics = None
    if prepared.eval is not None:
        # the schedule may already have evaluated at the final step; don't do it twice
        done = [line for line in trainer.state.log_history
                if "eval_loss" in line and line["step"] == result.global_step]
        eval_metrics = done[0] if done else trainer.evaluate()
    _save_final(cfg, trainer, model, log)
    log(summary(trainer, result, time.time() - start, out, adapter=hasattr(model, "peft_config")))
    if push and trainer.is_world_process_zero():
        hub.push_after_run(cfg, log)
    return RunResult(out, result.metrics, eval_metrics, trainer)


def check_disk(cfg: Config, plan: runs.Plan, model, tokenizer, train_pairs: int) -> list[str]:
    """The checkpoints the schedule will write against the free space under output_dir (disk.py):
    refused when they cannot fit, a warning when they barely do. Once the model is loaded (its exact
    trainable parameters and dtypes) and before the Trainer is built."""
    t, out = cfg.training, Path(cfg.training.output_dir)
    plugin = getattr(t, "deepspeed_plugin", None)
    stage = (plugin.deepspeed_config.get("zero_optimization") or {}).get("stage", 0) if plugin is not None else None
    start = checkpoints.state_step(Path(plan.resume)) if plan.resume else 0
    present = [c for c in checkpoints.complete_checkpoints(out) if checkpoints.step(c) <= start]
    need = disk.estimate(cfg, model, tokenizer, train_pairs, start, len(present), stage)
    return disk.check(need, out)


def _save_final(cfg: Config, trainer: PreferenceTrainer, model, log):
    """The final model, checked; its plots and model card; the manifest marked finished."""
    t, out = cfg.training, Path(cfg.training.output_dir)
    if trainer.is_world_process_zero():
        manifest.begin_final_save(out)
    trainer.save_model(t.output_dir)
    if trainer.is_world_process_zero():
        model.generation_config.save_pretrained(t.output_dir)
        n = check_saved(t.output_dir, cfg.model.trust_remote_code, adapter=hasattr(model, "peft_config"))
        log(f"prefopt: saved model checked: {n:,} parameters, every tensor present with its full shape")
        try:
            plots = plot_run(out)
            log(f"prefopt: plots of {', '.join(p.removesuffix('.png') for p in plots)} in {out / 'plots'}")
        except PrefoptError as e:  # nothing logged yet (max_steps below logging_steps): the run still succeeded
            log(f"prefopt: no plots: {e}")
        modelcard.write_card(cfg, out, log=log)  # before the manifest is updated: the card is the run's
        manifest.record_written(out, finished_step=trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()


def _stopped(signum: int, step: int, out: Path) -> Stopped:
    """A signal's stop at a step boundary, saying which checkpoint the next run continues from."""
    complete = checkpoints.complete_checkpoints(out)
    where = (f"{complete[-1]} is complete" if complete and complete[-1].name == f"checkpoint-{step}" else
             f"its checkpoint could not be written; the last complete one is {complete[-1]}" if complete else
             "no checkpoint could be written")
    return Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {step}: {where}. Run the same "
                           "command again to continue.")


def finished_message(out: Path, step: int | bool) -> str:
    """What to say when the command of a finished run is run again."""
    complete = checkpoints.complete_checkpoints(out)
    further = (f"To train further, run it with a larger max_steps (or num_train_epochs): it continues from "
               f"{complete[-1].name}." if complete else
               f"To train further, start a new run from its model (--model_name_or_path {out} with a new output_dir); "
               "it kept no checkpoint to continue from.")
    steps = f" ({step} steps)" if step is not True else ""
    return (f"prefopt: the run in {out} is complete{steps}; its model is in {out}. Nothing was changed. "
            + further)


SUMMARY_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen")


def summary(trainer, result, seconds: float, out: Path, adapter: bool) -> str:
    """The end of a run in a few lines: how long, how fast, how it ended, where things are."""
    t, state = trainer.args, trainer.state
    pairs = result.metrics.get("train_samples_per_second")
    lines = [f"prefopt: done: {state.global_step} steps in {seconds:.0f}s"
             + (f", {pairs:.3g} pairs/s" if pairs else "")
             + (f", train loss {result.metrics['train_loss']:.4g}" if "train_loss" in result.metrics else "")]
    evals = [line for line in state.log_history if "eval_loss" in line]
    if evals:
        last = evals[-1]
        shown = ", ".join(f"{k.removeprefix('eval_')} {last[k]:.4g}" for k in SUMMARY_METRICS if k in last)
        lines.append(f"  final eval (step {last['step']}): {shown}")
        best = max(evals, key=lambda line: line.get("eval_rewards/accuracies", float("-inf")))
        if "eval_rewards/accuracies" in best and len(evals) > 1:
            lines.append(f"  best eval accuracy: {best['eval_rewards/accuracies']:.4g} at step {best['step']}")
    lines.append(f"  {'adapter' if adapter else 'model'} and tokenizer: {out}; metrics: {out / 'metrics.jsonl'}; "
                 f"plots: {out / 'plots'}")
    if state.best_model_checkpoint:
        lines.append(f"  best checkpoint ({t.metric_for_best_model}): {state.best_model_checkpoint}")
    return "\n".join(lines)
