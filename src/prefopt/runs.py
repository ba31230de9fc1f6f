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
NOT_IDENTITY = {"output_dir", "resume_from_checkpoint", "report_to", "logging_steps", "logging_first_step",
                "logging_dir", "disable_tqdm", "dataloader_num_workers", "save_total_limit", "run_name",
                "project", "trackio_space_id", "eval_steps", "save_steps", "local_rank"}


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
    previous = out / CONFIG_FILE
    if cfg.run.overwrite_output_dir:
        if asked:
            raise PrefoptError("overwrite_output_dir and resume_from_checkpoint both set: keep one.")
        if main_process:
            for path in checkpoints(out):
                shutil.rmtree(path)
            for name in (METRICS_FILE, CONFIG_FILE):
                (out / name).unlink(missing_ok=True)
        return None
    if previous.is_file():
        try:
            old = yaml.safe_load(previous.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        changed = _differences(old, _plain(resolved_dict(cfg)))
        if changed:
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise PrefoptError(
                f"output_dir {out} holds a run with a different config ({shown}). Use a new output_dir, or "
                "set overwrite_output_dir: true (--overwrite_output_dir true) to delete that run's checkpoints "
                "and metrics and start afresh."
            )
    for path in checkpoints(out):
        if not is_complete(path) and main_process:
            log(f"prefopt: removing {path}: it was being written when the run stopped")
            shutil.rmtree(path)
    if asked and str(asked).lower() != "true":
        resume = Path(asked)
        if not (resume / "trainer_state.json").is_file():
            raise PrefoptError(f"resume_from_checkpoint: {asked} is not a checkpoint folder (no trainer_state.json); "
                               f"complete ones in {out}: {[p.name for p in checkpoints(out) if is_complete(p)] or 'none'}.")
    else:
        done = [p for p in checkpoints(out) if is_complete(p)]
        if asked and not done:
            raise PrefoptError(f"resume_from_checkpoint: true, but {out} holds no complete checkpoint.")
        resume = done[-1] if done else None
    if main_process:
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
        trim_metrics(out, step)  # what comes after the checkpoint is logged again
    if resume:
        log(f"prefopt: resuming from {resume}")
    return str(resume) if resume else None


def _plain(value):
    """The resolved dict as YAML would read it back (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(value))


def trim_metrics(output_dir: str | Path, step: int):
    """Drop metrics.jsonl lines logged after `step` (the run is resuming from there: they come again)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
