"""output_dir/prefopt_run.json: what the run in the folder wrote there, on what data, and whether
it finished.

    files        names at the top of output_dir that are the run's (overwrite_output_dir deletes these)
    foreign      what else was there when the run started, or started again: the user's, never touched
    data         `data_fingerprint`: a hash of each local data file and of each split's token ids
    processes    how many processes trained it (a resume must have as many)
    saving_from  the folder's names when the final save began; null when no save is under way
    finished     {"step": N} once the run has ended and saved; null before
    card         the hash of README.md (the model card, modelcard.py) as the run wrote it: once edited it is
                 the user's, never deleted, rewritten or counted as the run's

Checkpoints are not listed: their own marks (checkpoints.py) say which are prefopt's.
"""

import json
import re
from pathlib import Path

import xxhash

from .checkpoints import ASIDE, ASIDE_NAME, checkpoints, file_hash, is_checkpoint_name, is_ours, write_atomic
from .config import Config
from .provenance import PROVENANCE_FILE

MANIFEST = "prefopt_run.json"
CARD = "README.md"
CONFIG_FILE = "prefopt_config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK = ".prefopt.lock"
# What a run may write at the top of output_dir. A file of these names that this run did not write
# is refused at the start (the run would overwrite it); overwrite_output_dir deletes only the ones
# the run recorded in its manifest.
RUN_FILES = ("metrics.jsonl", "prefopt_config.yaml", "data_report.json", "training_args.bin", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
             "adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json",
             "trainer_state.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "plots", "runs",
             "eval_generations.jsonl", PROVENANCE_FILE, MANIFEST)


def is_run_file(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in RUN_FILES)


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write(out: Path, manifest: dict):
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def owned(out: Path, manifest: dict) -> list[Path]:
    """What the run in `out` wrote: its checkpoints and the files its manifest lists (for a run
    from before manifests: the run files present, except a README.md that may be the user's)."""
    if not out.is_dir():
        return []
    found = [c for c in checkpoints(out) if is_ours(c)] + sorted(
        c for c in out.glob(f"checkpoint-*{ASIDE}*") if ASIDE_NAME.fullmatch(c.name) and c.is_dir())
    if manifest:
        names = set(manifest.get("files", []))
        if manifest.get("saving_from") is not None:  # a final save was cut short: what it wrote is ours
            names |= {p.name for p in out.iterdir()} - set(manifest["saving_from"]) - set(manifest.get("foreign", []))
            names -= {LOCK}
            names = {n for n in names if not re.fullmatch(rf"checkpoint-\d+({ASIDE})?", n)}
    elif (out / CONFIG_FILE).is_file():
        names = {p.name for pattern in RUN_FILES for p in out.glob(pattern)} - {"README.md"}
    else:
        names = set()
    if card_edited(out, manifest):
        names.discard(CARD)
    return found + sorted(out / n for n in names if (out / n).exists() or (out / n).is_symlink())


def record_card(out: Path):
    """Note the hash of the model card just written: edited afterwards, README.md is the user's."""
    manifest = read_manifest(out)
    if manifest:
        manifest["card"] = file_hash(out / CARD)
        _write(out, manifest)


def card_edited(out: Path, manifest: dict) -> bool:
    """Whether README.md differs from the card the run wrote (False when the run wrote none)."""
    recorded, path = manifest.get("card"), out / CARD
    return recorded is not None and path.is_file() and file_hash(path) != recorded


def top_names(paths: list[Path]) -> list[str]:
    """The names among `paths` that are files or folders of the run itself, not checkpoints."""
    return sorted(p.name for p in paths if not is_checkpoint_name(p.name))


def start_manifest(out: Path, previous: dict, data: dict, processes: int):
    """The manifest of a run starting (or starting again) in `out`: what it owns there, its data,
    its process count; everything else now in the folder is the user's."""
    names = set(top_names(owned(out, previous))) | {MANIFEST, CONFIG_FILE, METRICS_FILE, "data_report.json",
                                                      "eval_generations.jsonl", PROVENANCE_FILE}
    # whatever else is here now is the user's, also what they put here since the run first started
    foreign = {p.name for p in out.iterdir() if p.name not in names and p.name != LOCK
               and not is_checkpoint_name(p.name)}
    manifest = dict(previous)
    manifest.update({"files": sorted(names), "data": data, "finished": None, "saving_from": None,
                     "foreign": sorted(foreign | set(manifest.get("foreign", []))), "processes": processes})
    _write(out, manifest)


def record_written(out: Path, finished_step: int | None = None):
    """Add what this run has written at the top of output_dir to its manifest (everything new but
    the user's own files, recorded as `foreign` when the run started, and a README.md the run did
    not write); mark it finished."""
    manifest = read_manifest(out)
    if not manifest:  # not a folder prefopt's pipeline set up (a Trainer built in Python)
        return
    foreign = set(manifest.get("foreign", [])) | {LOCK}
    present = {p.name for p in out.iterdir() if not re.fullmatch(r"checkpoint-\d+|.*\.tmp", p.name)
               and not ASIDE_NAME.fullmatch(p.name)}
    # the run's own: files of the names it writes, and whatever the final save added
    saved = present - set(manifest.get("saving_from") or present)
    ours = {n for n in present if is_run_file(n)} | saved
    # README.md is the run's only once it wrote it: its card (hash recorded) or the final save's (PEFT's
    # template, which the card replaces); one that is merely there is the user's, put there mid-run
    if manifest.get("card") is None and CARD not in saved:
        ours.discard(CARD)
    manifest["files"] = sorted(set(manifest.get("files", [])) | (ours - foreign))
    manifest["saving_from"] = None
    if finished_step is not None:
        manifest["finished"] = {"step": finished_step}
    _write(out, manifest)


def begin_final_save(out: Path):
    """Note what the folder holds before the final save: if the save is cut short, what appeared
    since is the save's (and so prefopt's to overwrite or delete)."""
    manifest = read_manifest(out)
    manifest["saving_from"] = sorted(p.name for p in out.iterdir())
    _write(out, manifest)


def data_fingerprint(cfg: Config, prepared) -> dict:
    """What the run trains on: a hash of every local data file named in the config, and of the
    token ids of each split as prepared (so a changed tokenizer, template or option shows too)."""
    files = {}
    for source in cfg.data.train_datasets + cfg.data.eval_datasets:
        root = Path(source.path).expanduser()
        paths = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts))
        for path in paths if root.exists() else []:
            files[str(path)] = file_hash(path)
    out = {"files": files}
    for split, ds in (("train", prepared.train), ("eval", prepared.eval)):
        out[split], out[split + "_pairs"] = (_token_hash(ds), len(ds)) if ds is not None else (None, 0)
    return out


def _token_hash(ds) -> str:
    import pyarrow.compute as pc

    h = xxhash.xxh3_128()
    for batch in ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow").iter(4096):
        for column in batch.columns:
            h.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def data_changes(recorded: dict | None, fingerprint: dict) -> list[str]:
    """What differs between the data a run recorded (its manifest's `data`) and the data prepared now."""
    if not recorded:
        return []
    changed = [f"{name} changed" for name in sorted(set(recorded.get("files", {})) | set(fingerprint["files"]))
               if recorded.get("files", {}).get(name) != fingerprint["files"].get(name)]
    for split in ("train", "eval"):
        if recorded.get(split) != fingerprint.get(split):
            changed.append(f"the {split} split's token ids differ ({recorded.get(split + '_pairs')} → "
                           f"{fingerprint.get(split + '_pairs')} pairs)")
    return changed
