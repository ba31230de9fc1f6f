"""The `checkpoint-N` folders in output_dir: which are prefopt's, which are complete and intact,
and which to rotate out.

    checkpoint-N/
      prefopt_checkpoint_writing     while prefopt writes it (the Trainer's save is under way)
      prefopt_checkpoint_complete    once every process has written it: {"step": N, "files": {name: [size, xxh3]}}
    checkpoint-N.set-aside[-k]/      one of ours that a resume skipped (damaged, no optimizer state) or went back past
                                   (never deleted by prefopt)

A checkpoint is complete only once its mark is in place, so a run killed while saving leaves a
folder without one; the sizes and hashes in the mark show a checkpoint damaged later. Folders
without either file are not prefopt's: nothing here removes or rotates them.
"""

import json
import re
import shutil
from pathlib import Path

import xxhash

COMPLETE = "prefopt_checkpoint_complete"
WRITING = "prefopt_checkpoint_writing"  # in a checkpoint prefopt is writing; replaced by COMPLETE
ASIDE = ".set-aside"  # suffix of a checkpoint of ours that a resume skipped or went back past
NAME = re.compile(r"checkpoint-\d+")
ASIDE_NAME = re.compile(rf"checkpoint-\d+{re.escape(ASIDE)}(-\d+)?")


def is_checkpoint_name(name: str) -> bool:
    """`checkpoint-N` or one set aside: folders the run's own file list never holds."""
    return bool(NAME.fullmatch(name) or ASIDE_NAME.fullmatch(name))


def checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders, by step."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=step)


def step(checkpoint: Path) -> int:
    """N of `checkpoint-N`."""
    return int(checkpoint.name.split("-")[1])


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete `checkpoint-N` folders, by step."""
    return [c for c in checkpoints(output_dir) if is_complete(c)]


def is_ours(checkpoint: Path) -> bool:
    """Written (or being written) by prefopt: only these are ever removed or rotated out."""
    return (checkpoint / COMPLETE).is_file() or (checkpoint / WRITING).is_file()


def start_writing(checkpoint: Path):
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / COMPLETE).unlink(missing_ok=True)  # rewriting a folder resumed from earlier
    (checkpoint / WRITING).write_text("")


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str):
    """Written whole beside `path`, then renamed into place: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (COMPLETE, WRITING))


def mark_complete(checkpoint: Path):
    """The size and hash of every file, then the mark (written whole, then renamed into place)."""
    files = {str(p.relative_to(checkpoint)): [p.stat().st_size, file_hash(p)] for p in _files(checkpoint)}
    write_atomic(checkpoint / COMPLETE, json.dumps({"step": step(checkpoint), "files": files}, indent=0) + "\n")
    (checkpoint / WRITING).unlink(missing_ok=True)


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint (a file missing, cut short or changed), or None."""
    try:
        mark = json.loads((checkpoint / COMPLETE).read_text() or "{}") if is_complete(checkpoint) else {}
    except (OSError, json.JSONDecodeError):
        return f"its mark {checkpoint / COMPLETE} is unreadable"
    for name, (size, digest) in (mark.get("files") or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, {size:,} when written"
        if file_hash(path) != digest:
            return f"{path} changed since it was written (checksum differs)"
    try:  # a mark from before checksums: at least the state must read
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return f"{checkpoint / 'trainer_state.json'} is missing or unreadable"
    return None


def has_optimizer_state(checkpoint: Path) -> bool:
    """The Trainer's optimizer.pt, DeepSpeed's global_stepN/, or FSDP's optimizer.bin /
    optimizer_0/ (distributed checkpoint) / optimizer_0_rank*.bin."""
    return any((checkpoint / "optimizer.pt").is_file() or any(checkpoint.glob(pattern))
               for pattern in ("global_step*", "optimizer.bin", "optimizer_*"))


def state_step(checkpoint: Path) -> int:
    """The Trainer's global step when it wrote the checkpoint."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def logged_lines(checkpoint: Path) -> int:
    """How many metrics.jsonl lines had been written when the checkpoint was: one per entry of the
    Trainer's log history, which the checkpoint holds."""
    return len(json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", []))


def rotate(output_dir: str | Path, limit: int | None, keep: str | None = None):
    """Keep the newest `limit` complete checkpoints prefopt wrote (and `keep`, the best one); delete
    older ones. Folders prefopt did not write are never touched, whatever their names."""
    if not limit or limit <= 0:
        return
    ours = complete_checkpoints(output_dir)
    kept = set(ours[-limit:]) | {p for p in ours if keep and Path(keep).resolve() == p.resolve()}
    for path in ours:
        if path not in kept:
            shutil.rmtree(path)
