"""What a run finds in its output_dir, and what it does about it.

    output_dir/
      prefopt_config.yaml        the resolved config of the run that owns this folder
      metrics.jsonl              one line per log
      checkpoint-N/              written by the Trainer; complete once COMPLETE is in it

Running the same command again resumes from the last *complete* checkpoint, as the SimPO repo's
scripts do; `resume_from_checkpoint: PATH` picks one. A checkpoint is marked complete only after
every process has finished writing it, so a run killed while saving leaves a folder without the
mark, which is never resumed from (it is removed when the run starts again). A folder that holds
a run with a different config is refused unless `overwrite_output_dir` says to start afresh.
"""

import json
import re
import shutil
from pathlib import Path

import yaml

from .config import Config, resolved_dict
from .errors import PrefoptError

COMPLETE = "prefopt_checkpoint_complete"
CONFIG_FILE = "prefopt_config.yaml"
METRICS_FILE = "metrics.jsonl"
# Keys that change how a run is watched or launched, not what it computes
NOT_IDENTITY = {
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "local_rank", "run_name", "project",
    "trackio_space_id", "report_to", "logging_steps", "logging_first_step", "logging_strategy", "logging_dir",
    "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm", "eval_steps", "eval_strategy",
    "eval_on_start", "per_device_eval_batch_size", "eval_accumulation_steps", "save_steps", "save_strategy",
    "save_total_limit", "save_only_model", "save_on_each_node", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "dataloader_num_workers",
    "dataloader_prefetch_factor", "dataloader_persistent_workers", "dataloader_pin_memory", "ddp_timeout",
    "include_num_input_tokens_seen", "torch_empty_cache_steps", "preprocessing_num_workers",
    "max_dropped_share", "allow_pickle_weights", "logprob_chunk_size",
}


def checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders, by step."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def mark_complete(checkpoint: Path):
    (checkpoint / COMPLETE).write_text(json.dumps({"step": int(checkpoint.name.split("-")[1])}) + "\n")


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - NOT_IDENTITY)
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_output_dir(cfg: Config, main_process: bool = True, log=print) -> str | None:
    """Decide what happens to an existing run in output_dir; the checkpoint to resume from, if any.

    Every process calls it before anything is written there, the main process first; only the
    main process deletes (an overwritten run, a checkpoint left half-written, metrics lines that
    will be logged again).
    """
    out = Path(cfg.training.output_dir)
    asked = cfg.training.resume_from_checkpoint
    if cfg.run.overwrite_output_dir:
        if asked:
            raise PrefoptError("overwrite_output_dir and resume_from_checkpoint both set: keep one.")
        if main_process:
            _clear(out)
        return None
    _check_same_run(cfg, out)
    found = checkpoints(out)
    marked = [p for p in found if is_complete(p)]
    if marked:
        # Only a checkpoint newer than the newest complete one can have been cut short while saving.
        for path in found:
            if not is_complete(path) and _step(path) > _step(marked[-1]) and main_process and str(path) != str(asked):
                log(f"prefopt: removing {path}: it was being written when the run stopped")
                shutil.rmtree(path)
        candidates = marked
    else:  # written by another tool or an earlier version: complete if the Trainer finished its state
        candidates = [p for p in found if (p / "trainer_state.json").is_file()]
    if asked and str(asked).lower() != "true":
        resume = Path(asked)
        if not (resume / "trainer_state.json").is_file():
            raise PrefoptError(f"resume_from_checkpoint: {asked} is not a checkpoint folder (no trainer_state.json); "
                               f"complete ones in {out}: {[p.name for p in candidates] or 'none'}.")
    else:
        if asked and not candidates:
            raise PrefoptError(f"resume_from_checkpoint: true, but {out} holds no complete checkpoint.")
        resume = candidates[-1] if candidates else None
    if resume is not None and not (resume / "optimizer.pt").is_file() and not any(resume.glob("global_step*")):
        raise PrefoptError(
            f"{resume} holds no optimizer state (save_only_model?), so resuming from it would not continue the same "
            "run. Use a new output_dir (the weights there can be model_name_or_path), or --overwrite_output_dir true."
        )
    if main_process:
        trim_metrics(out, _state_step(resume) if resume else 0)  # what comes after the checkpoint is logged again
    if resume:
        log(f"prefopt: resuming from {resume}")
    return str(resume) if resume else None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _state_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def _check_same_run(cfg: Config, out: Path):
    previous = out / CONFIG_FILE
    if not previous.is_file():
        return
    from .config import build_config

    try:  # read back through today's config code, so defaults compare like with like
        old = _plain(resolved_dict(build_config(yaml.safe_load(previous.read_text()) or {}, str(previous))))
    except (PrefoptError, yaml.YAMLError):
        old = yaml.safe_load(previous.read_text()) if previous.is_file() else {}
    changed = _differences(old or {}, _plain(resolved_dict(cfg)))
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise PrefoptError(
            f"output_dir {out} holds a run with a different config ({shown}). Use a new output_dir, or "
            "set overwrite_output_dir: true (--overwrite_output_dir true) to delete that run and start afresh."
        )


# what a run writes into output_dir: removed by overwrite_output_dir (nothing else is touched)
RUN_FILES = ("metrics.jsonl", "prefopt_config.yaml", "data_report.json", "training_args.bin", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
             "adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


def _clear(out: Path):
    for path in checkpoints(out):
        shutil.rmtree(path)
    for pattern in RUN_FILES:
        for path in out.glob(pattern):
            path.unlink()
    for folder in ("plots", "runs"):
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)


def _plain(value):
    """The resolved dict as YAML would read it back (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(value))


def trim_metrics(output_dir: str | Path, step: int):
    """Drop metrics.jsonl lines logged after `step` (the run is resuming from there: they come again)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        # the end-of-training summary is written again when the resumed run ends
        if entry.get("step", 0) <= step and "train_runtime" not in entry:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
