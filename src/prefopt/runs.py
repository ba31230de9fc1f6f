"""What a run finds in its output_dir, and what it does about it.

    output_dir/
      .prefopt.lock              held (flock) by the one run using the folder; a killed run's lock ends with it
      prefopt_run.json           what this run wrote here, the data it trains on, whether it finished (manifest.py)
      prefopt_config.yaml        the resolved config of the run that owns this folder
      metrics.jsonl              one line per log
      checkpoint-N/              written by the Trainer; complete once COMPLETE (with checksums) is in it (checkpoints.py)

Running the same command again resumes from the last *complete, intact* checkpoint, as the SimPO
repo's scripts do; `resume_from_checkpoint: PATH` picks one. A finished run is left untouched:
its command, run again, says so and exits. A larger `max_steps` / `num_train_epochs` continues it
from its last checkpoint. A checkpoint is marked complete only after every process has finished
writing it, with the size and xxh3 hash of every file, so a run killed while saving leaves a folder
without the mark (removed when the run starts again) and a checkpoint damaged later is detected
and moved aside. A folder that holds a run with a different config or different data is refused
unless `overwrite_output_dir` says to start afresh, which deletes only what that run wrote.

`plan` only reads; `commit` makes the changes, after the data has been prepared, so a run refused
for its data leaves the folder as it was.
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoints import (ASIDE, COMPLETE, checkpoints, complete_checkpoints, damage, has_optimizer_state,
                          is_checkpoint_name, is_complete, is_ours, logged_lines, state_step, step, write_atomic)
from .config import Config, resolved_dict
from .errors import PrefoptError
from .manifest import (CONFIG_FILE, LOCK, METRICS_FILE, RUN_FILES, data_changes, owned, read_manifest,
                       start_manifest, top_names)


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
    "max_dropped_share", "allow_pickle_weights", "logprob_chunk_size", "logprob_keep_mb",
}
# Keys that say how long to train: a larger value continues a run from its last checkpoint
LENGTH = ("max_steps", "num_train_epochs")


# -- the folder's lock ------------------------------------------------------------------------

class Lock:
    """One run per output_dir at a time: an exclusive flock on output_dir/.prefopt.lock, held until
    the run returns. The kernel drops it when the process ends, however it ends, so a killed run
    never leaves it stuck."""

    def __init__(self, out: Path):
        self.path, self.fh, self.unsupported = out / LOCK, None, None

    def acquire(self):
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise PrefoptError(f"output_dir {self.path.parent} is a file, not a folder: choose another output_dir.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "a+")  # noqa: SIM115 (held open for the run's lifetime)
        except OSError as e:
            raise file_system_error(e, self.path.parent, "start the run") from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # ENOLCK, ENOSYS: Lustre without flock, NFSv3 without lockd
                self.unsupported = f"{e.strerror}"
                return
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise PrefoptError(f"output_dir {self.path.parent} is in use by another prefopt run ({holder}). Wait for "
                               "it to end, or use another output_dir.") from None

    def release(self):
        """At the end of the run (a later run in the same process, as in a notebook, takes it again)."""
        if self.fh is not None:
            self.fh.close()  # closing the file drops its flock
            self.fh = None

    def record_holder(self):
        if self.unsupported:
            return
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.fh.flush()


# -- file-system failures -------------------------------------------------------------------------

FS_FIXES = {
    errno.ENOSPC: "the disk is full: free space there (or point output_dir elsewhere)",
    errno.EDQUOT: "the disk quota is used up: free space there (or point output_dir elsewhere)",
    errno.EROFS: "the file system is read-only: choose an output_dir on a writable disk",
    errno.EACCES: "permission denied: choose an output_dir you can write to",
    errno.ENOTDIR: "a file stands where a folder is needed: move it, or choose another output_dir",
    errno.EISDIR: "a folder stands where a file is needed: move it, or choose another output_dir",
}


def file_system_error(e: BaseException, where: Path, doing: str, checkpoint: str | None = None) -> PrefoptError:
    """One message for a failed write: the path, the cause, the fix, and what is intact."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code is None:  # torch.save's zip writer and safetensors say it in words
        code = (errno.EROFS if "Read-only" in text or "os error 30" in text else
                errno.EDQUOT if "quota" in text else errno.ENOSPC)
    fix = FS_FIXES.get(code, "check that the disk has space and output_dir is writable")
    path = getattr(e, "filename", None) or where
    intact = (f" The last complete checkpoint, {checkpoint}, is intact; run the same command again to continue "
              "from it." if checkpoint else "")
    return PrefoptError(f"could not {doing}: {path}: {getattr(e, 'strerror', None) or text.splitlines()[0]} — {fix}."
                        + intact)


DISK_WORDS = ("file write failed", "No space left", "os error 28", "Read-only file system", "os error 30",
              "Disk quota exceeded")


def is_file_system_error(e: BaseException) -> bool:
    """An OSError of the file system, or one that torch.save or safetensors wrapped in its own type."""
    if isinstance(e, OSError) and e.errno in FS_FIXES:
        return True
    return any(word in str(e) for word in DISK_WORDS)


# -- what the folder holds, and what to do -----------------------------------------------------------

@dataclass
class Plan:
    out: Path
    finished: bool = False  # the run in the folder is complete: nothing to do
    resume: str | None = None
    notes: list[str] = field(default_factory=list)  # said to the user before training
    remove: list[Path] = field(default_factory=list)  # ours, to delete at commit
    move_aside: list[tuple[Path, Path]] = field(default_factory=list)  # damaged checkpoints
    keep_lines: int | None = None  # metrics.jsonl lines the checkpoint had logged
    manifest: dict = field(default_factory=dict)
    fresh: bool = True  # nothing of an earlier run is kept
    finished_step: int | None = None


def _resume_asked(cfg: Config) -> str | bool | None:
    """`resume_from_checkpoint`: a path, True (HF/TRL's `true`; YAML `yes`), or None (`false`, `no`)."""
    asked = cfg.training.resume_from_checkpoint
    if asked is None or isinstance(asked, bool):
        return asked or None
    if str(asked).lower() in ("true", "yes"):
        return True
    if str(asked).lower() in ("false", "no", ""):
        return None
    return str(asked)


def plan(cfg: Config) -> Plan:
    """Read output_dir and decide: finished, resume from where, or start afresh. Reads only."""
    out = Path(cfg.training.output_dir)
    check_place(cfg)
    asked = _resume_asked(cfg)
    manifest = read_manifest(out)
    if cfg.run.overwrite_output_dir:
        return _plan_overwrite(out, manifest, asked)
    p = Plan(out=out)
    length_changed = _length_changes(cfg, out)
    legacy = (out / CONFIG_FILE).is_file() and not manifest  # written by prefopt before manifests
    p.manifest = manifest or ({"files": top_names(owned(out, {}))} if legacy else {})
    finished = manifest.get("finished") or (legacy and _legacy_finished(out))
    if finished and not length_changed:
        p.finished = True
        p.finished_step = finished["step"] if isinstance(finished, dict) else finished
        return p
    found = checkpoints(out)
    marked = [c for c in found if is_complete(c)]
    _remove_cut_short(p, found, marked, asked, legacy)
    _check_collisions(out, set(owned(out, p.manifest)) | set(p.remove))
    if asked not in (None, True):
        resume = _named_resume(asked, out, marked)
    else:
        resume = _newest_resumable(p, found, marked, asked, finished)
    if resume is not None:
        _plan_resume(p, cfg, resume, marked, length_changed)
    return p


def _plan_overwrite(out: Path, manifest: dict, asked) -> Plan:
    """overwrite_output_dir: delete what the earlier run wrote (and only that), start afresh."""
    if asked:
        raise PrefoptError("overwrite_output_dir and resume_from_checkpoint both set: keep one.")
    p = Plan(out=out, remove=owned(out, manifest))
    if p.remove:
        p.notes.append(f"prefopt: overwrite_output_dir: removing the earlier run's files in {out}")
    _check_collisions(out, set(p.remove))
    return p


def _length_changes(cfg: Config, out: Path) -> dict:
    """Refuse a folder whose run has another config; the length keys that differ, {key: (old, new)}."""
    changed, length_changed = _config_changes(cfg, out)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise PrefoptError(
            f"output_dir {out} holds a run with a different config ({shown}). Use a new output_dir, or "
            "set overwrite_output_dir: true (--overwrite_output_dir true) to delete that run and start afresh."
        )
    if cfg.training.max_steps > 0:  # max_steps decides the length: num_train_epochs changes nothing
        length_changed.pop("num_train_epochs", None)
    return length_changed


def _remove_cut_short(p: Plan, found: list[Path], marked: list[Path], asked, legacy: bool):
    """Plan to remove our checkpoints that a stopped run was writing."""
    newest = step(marked[-1]) if marked else -1
    for path in found:  # only a checkpoint newer than the newest complete one can have been cut short
        if (is_ours(path) or legacy) and not is_complete(path) and step(path) > newest:
            if asked not in (None, True) and path.resolve() == Path(asked).resolve():
                raise PrefoptError(f"resume_from_checkpoint: {path} was cut short while being written (it has no "
                                   f"completion mark). Complete ones: {[c.name for c in marked] or 'none'}.")
            p.remove.append(path)
            p.notes.append(f"prefopt: removing {path}: it was being written when the run stopped")


def _named_resume(asked: str, out: Path, marked: list[Path]) -> Path:
    """`resume_from_checkpoint: PATH`, refused unless it is an intact checkpoint with optimizer state."""
    resume = Path(asked)
    if not (resume / "trainer_state.json").is_file():
        raise PrefoptError(f"resume_from_checkpoint: {asked} is not a checkpoint folder (no trainer_state.json); "
                           f"complete ones in {out}: {[c.name for c in marked] or 'none'}.")
    problem = damage(resume) if is_complete(resume) else None
    if problem:
        raise PrefoptError(f"resume_from_checkpoint: {resume} is damaged: {problem}. Name another checkpoint.")
    _check_resumable(resume, marked)
    return resume


def _newest_resumable(p: Plan, found: list[Path], marked: list[Path], asked, finished) -> Path | None:
    """The newest complete, intact checkpoint with optimizer state (the ones skipped noted), or
    None for a run with nothing to resume, which then starts afresh."""
    out = p.out
    candidates = marked or [c for c in found if (c / "trainer_state.json").is_file() and not is_ours(c)]
    resume, skipped = None, []
    for c in reversed(candidates):
        problem = damage(c)
        if problem is None and not has_optimizer_state(c):
            problem = "it holds no optimizer state (save_only_model)"
        if problem is None:
            resume = c
            break
        skipped.append(f"{c.name}: {problem}")
        p.notes.append(f"prefopt: warning: {c} cannot be resumed from: {problem}.")
    if candidates and resume is None:
        raise PrefoptError(f"no checkpoint in {out} can be resumed from ({'; '.join(skipped)}). Start afresh "
                           "(--overwrite_output_dir true, or a new output_dir).")
    if asked and resume is None:
        raise PrefoptError(f"resume_from_checkpoint: true, but {out} holds no complete checkpoint.")
    if finished and resume is None:
        raise PrefoptError(
            f"{out} holds a finished run with no checkpoint to continue from (save_strategy: no). To train "
            f"further, start a new run from its model: --model_name_or_path {out} --output_dir NEW_DIR.")
    return resume


def _plan_resume(p: Plan, cfg: Config, resume: Path, marked: list[Path], length_changed: dict):
    """Continue from `resume`: on as many processes as before, our later checkpoints moved aside."""
    out, at = p.out, state_step(resume)
    before, now = p.manifest.get("processes"), cfg.training.world_size
    if before not in (None, now):
        raise PrefoptError(
            f"the run in {out} was trained on {before} processes and this start has {now}: the global batch "
            f"would change ({before} × {cfg.training.per_device_train_batch_size} × "
            f"{cfg.training.gradient_accumulation_steps} → {now} × ...), and the data order with it. Launch it "
            "on as many processes as before, or start afresh (--overwrite_output_dir true, or a new output_dir).")
    # checkpoints of ours past the resume point are written again as training gets there; moved
    # aside (not deleted) so rotation can never keep them over the new ones
    for c in marked:
        if step(c) > at and c.resolve() != resume.resolve():
            aside = c.with_name(f"{c.name}{ASIDE}")
            p.move_aside.append((c, aside))
            p.notes.append(f"prefopt: moving {c} aside to {aside}: the run continues from {resume.name} "
                           "(delete it when you no longer need it)")
    for key, (old, new) in length_changed.items():
        p.notes.append(f"prefopt: {key} {old} → {new}: continuing the run from {resume}")
    if "max_steps" in length_changed and 0 < cfg.training.max_steps <= at:
        raise PrefoptError(f"max_steps {cfg.training.max_steps}: the run in {out} is already at step {at} "
                           f"({resume}); give a larger max_steps to train further.")
    p.notes.append(f"prefopt: resuming from {resume}")
    p.resume = str(resume)
    p.keep_lines = logged_lines(resume)
    p.fresh = False


def _legacy_finished(out: Path) -> int | bool:
    """A run from before manifests finished if its final model is there and its newest checkpoint
    (if any) is at its last step."""
    if not any((out / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                    "adapter_model.safetensors")):
        return False
    marked = complete_checkpoints(out)
    if not marked:
        return True
    try:
        state = json.loads((marked[-1] / "trainer_state.json").read_text())
        return state["global_step"] if state["global_step"] >= state["max_steps"] else False
    except (OSError, json.JSONDecodeError, KeyError):
        return False


def _check_resumable(resume: Path, marked: list[Path]):
    if not has_optimizer_state(resume):
        others = [c.name for c in marked if c != resume and has_optimizer_state(c)]
        raise PrefoptError(
            f"{resume} holds no optimizer state (save_only_model?), so resuming from it would not continue the same "
            "run. " + (f"Resume from {others[-1]} instead (--resume_from_checkpoint {resume.parent / others[-1]}), "
                       if others else "") + "or start a new run from its weights (--model_name_or_path "
            f"{resume} with a new output_dir).")


def check_place(cfg: Config):
    """Refuse an output_dir that is a file, or that is (or holds) the model trained from: before
    anything, the lock included, is written there."""
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise PrefoptError(f"output_dir {out} is a file, not a folder: choose another output_dir.")
    _check_model_not_inside(cfg, out)


def _check_model_not_inside(cfg: Config, out: Path):
    """The model trained from must not be something this run may delete or overwrite."""
    model = Path(cfg.model.model_name_or_path or "")
    if not model.exists():
        return
    model, root = model.resolve(), out.resolve()
    if model == root:
        raise PrefoptError(f"output_dir {out} is the model being trained from (model_name_or_path): the final "
                           "save would overwrite it. Choose another output_dir.")
    if root in model.parents and is_checkpoint_name(model.relative_to(root).parts[0]):
        raise PrefoptError(f"model_name_or_path {cfg.model.model_name_or_path} is a checkpoint inside output_dir "
                           f"{out}, which this run may rotate out or overwrite. Copy it elsewhere, or use another "
                           "output_dir.")


def _check_collisions(out: Path, owned_: set[Path]):
    """Refuse to start where the run would overwrite or rotate out something it did not write."""
    if not out.is_dir():
        return
    clash = sorted(p.name for pattern in RUN_FILES for p in out.glob(pattern) if p not in owned_)
    clash += [c.name for c in checkpoints(out) if c not in owned_ and not (c / "trainer_state.json").is_file()]
    if clash:
        raise PrefoptError(f"output_dir {out} holds {', '.join(clash)}, which this run did not write and would "
                           "overwrite. Move them, or choose another output_dir.")


def _config_changes(cfg: Config, out: Path) -> tuple[list[str], dict]:
    """Differences from the config the folder's run recorded (read back through today's defaults):
    identity keys that differ, and length keys that differ (old, new)."""
    previous = out / CONFIG_FILE
    if not previous.is_file():
        return [], {}
    from .config import build_config

    text = previous.read_text()
    try:
        old = _plain(resolved_dict(build_config(yaml.safe_load(text) or {}, str(previous))))
    except (PrefoptError, yaml.YAMLError):
        old = yaml.safe_load(text) or {}
    new = _plain(resolved_dict(cfg))
    keys = sorted((set(old) | set(new)) - NOT_IDENTITY)
    length = {k: (old.get(k), new.get(k)) for k in LENGTH if old.get(k) != new.get(k)}
    changed = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if k not in LENGTH and old.get(k) != new.get(k)]
    return changed, length


def _plain(value):
    """The resolved dict as YAML would read it back (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(value))


# -- carrying it out -------------------------------------------------------------------------------

def commit(plan_: Plan, fingerprint: dict, processes: int, log=print):
    """Carry out the plan (main process only): remove what is ours and cut short, move damaged
    checkpoints aside, cut metrics.jsonl back to the checkpoint, and start the manifest. `fingerprint`
    is `data_fingerprint` of the data prepared now: a resume on other data is refused."""
    out = plan_.out
    changed = [] if plan_.fresh else data_changes(plan_.manifest.get("data"), fingerprint)
    if changed:
        raise PrefoptError(
            f"the data changed since {plan_.resume} was written: {'; '.join(changed)}. Resuming would continue the "
            f"run on other data. Restore the data, or start afresh (--overwrite_output_dir true, or a new output_dir).")
    for line in plan_.notes:
        log(line)
    _remove_and_set_aside(plan_)
    out.mkdir(parents=True, exist_ok=True)
    trim_metrics(out, 0 if plan_.fresh else plan_.keep_lines)
    start_manifest(out, plan_.manifest, fingerprint, processes)


def _remove_and_set_aside(plan_: Plan):
    for path in plan_.remove:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for src, dst in plan_.move_aside:
        n = 1
        while dst.exists():  # an earlier set-aside of the same step is kept too
            dst, n = src.with_name(f"{src.name}{ASIDE}-{n}"), n + 1
        (src / COMPLETE).unlink(missing_ok=True)
        src.rename(dst)


def trim_metrics(output_dir: str | Path, lines: int):
    """Keep the first `lines` lines of metrics.jsonl (what the checkpoint resumed from had logged);
    the rest is logged again."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    if not path.is_file():
        raise PrefoptError(f"{path} is not a file: move it away (prefopt writes its metrics there).")
    kept = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        kept.append(line + "\n")
    if len(kept) != lines or path.read_text() != "".join(kept):
        write_atomic(path, "".join(kept[:lines]))
