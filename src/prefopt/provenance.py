"""output_dir/prefopt_provenance.json: what a run was made with, so it can be made again.

    {"packages":  {"torch": "2.13.0", "transformers": "5.23.0", ...},   # deepspeed, bitsandbytes when used
     "python":    "3.11.9",
     "prefopt":   {"version": "0.1.0", "commit": "b0b61f7…", "dirty": false},   # commit: from a git checkout only
     "tokenizer": "sha256:…",      # the tokenizer as it tokenized the data (vocabulary, merges, special tokens)
     "chat_template": "sha256:…",  # the chat template installed on it (null: none)
     "seed": 42,
     "earlier": [...]}             # the records of the starts before a resume, where they differed

Written by the first process when the run changes its output_dir for the first time (after the
data is prepared, so the tokenizer and template are the ones the data was tokenized with). A
resume compares the record with what it runs under now: a different package set (or Python,
prefopt version or commit) is a warning naming each package and both versions, never a refusal: the data
fingerprint (manifest.py) already refuses other token ids, and the config check another seed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .checkpoints import write_atomic

PROVENANCE_FILE = "prefopt_provenance.json"
PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "safetensors",
            "huggingface_hub")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Installed versions by distribution name (None: not installed)."""
    out = {}
    for name in PACKAGES + extra:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(package_dir: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def prefopt_source() -> dict:
    """prefopt's version, and its git commit when it is imported from a checkout: the package's own
    files must be tracked there (a wheel installed in a virtual environment inside some other
    repository is not that repository's commit). `dirty`: the package's files differ from the commit."""
    import prefopt

    package_dir = Path(prefopt.__file__).resolve().parent
    try:
        version = metadata.version("prefopt")
    except metadata.PackageNotFoundError:
        version = getattr(prefopt, "__version__", None)
    out = {"version": version, "commit": None, "dirty": None}
    if _git(package_dir, "ls-files", "--error-unmatch", "__init__.py") is None:
        return out
    commit = _git(package_dir, "rev-parse", "HEAD")
    if commit:
        status = _git(package_dir, "status", "--porcelain", "--untracked-files=no", "--", ".")
        out.update(commit=commit, dirty=bool(status) if status is not None else None)
    return out


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """A hash of what the tokenizer turns text into: a fast tokenizer's whole serialized state
    (model, normalizer, pre-tokenizer, added tokens), or else its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:
        state = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())})
    return _sha256(state + "\n" + special)


def chat_template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    return _sha256(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def collect(cfg, tokenizer) -> dict:
    """The record of a run starting now, with `tokenizer` as the data was tokenized with."""
    from .pipeline import sharding_asked_for
    from accelerate.utils import DistributedType

    extra = ()
    if sharding_asked_for(cfg.training) == DistributedType.DEEPSPEED:
        extra += ("deepspeed",)
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        extra += ("bitsandbytes",)
    return {"packages": package_versions(extra), "python": platform.python_version(), "prefopt": prefopt_source(),
            "tokenizer": tokenizer_hash(tokenizer), "chat_template": chat_template_hash(tokenizer),
            "seed": cfg.training.seed}


def read(out: str | Path) -> dict:
    try:
        return json.loads((Path(out) / PROVENANCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def differences(old: dict, new: dict) -> list[str]:
    """Each package (and Python, prefopt's version or commit) that differs: 'torch 2.12.0 → 2.13.0'."""
    before, now = old.get("packages") or {}, new.get("packages") or {}
    # a package recorded by one start only (deepspeed, bitsandbytes: recorded when used) is not compared
    changed = [f"{name} {before[name] or 'not installed'} → {now[name] or 'not installed'}"
               for name in sorted(set(before) & set(now)) if before[name] != now[name]]
    if old.get("python") and new.get("python") and old["python"] != new["python"]:
        changed.append(f"Python {old['python']} → {new['python']}")
    old_p, new_p = old.get("prefopt") or {}, new.get("prefopt") or {}
    if old_p.get("version") != new_p.get("version"):
        changed.append(f"prefopt {old_p.get('version')} → {new_p.get('version')}")
    elif old_p.get("commit") != new_p.get("commit") and old_p.get("commit") and new_p.get("commit"):
        changed.append(f"prefopt commit {old_p['commit'][:12]} → {new_p['commit'][:12]}")
    return changed


def record(out: str | Path, current: dict, resumed: bool, log=print):
    """Write the record of this start (first process only). On a resume, say what differs from the
    record of the start it continues, and keep that record under `earlier` when it differs."""
    path = Path(out) / PROVENANCE_FILE
    previous = read(out) if resumed else {}
    changed = differences(previous, current) if previous else []
    if changed:
        log(f"prefopt: warning: the run in {out} was started with other packages than this resume: "
            f"{', '.join(changed)}; it may not continue exactly as it would have.")
    earlier = list(previous.pop("earlier", [])) if previous else []
    if previous and previous != current:
        earlier.append(previous)
    write_atomic(path, json.dumps({**current, "earlier": earlier}, indent=1) + "\n")


def card_lines(rec: dict) -> list[str]:
    """The record as the model card's Markdown list."""
    if not rec:
        return []
    packages = ", ".join(f"{k} {v}" for k, v in (rec.get("packages") or {}).items() if v)
    p = rec.get("prefopt") or {}
    source = f"prefopt {p.get('version')}" + (f", commit {p['commit']}" + (" (with local changes)" if p.get("dirty")
                                                                          else "") if p.get("commit") else "")
    lines = [f"- {source}", f"- Python {rec.get('python')}; {packages}", f"- seed: {rec.get('seed')}",
             f"- tokenizer: `{rec.get('tokenizer')}`", f"- chat template: `{rec.get('chat_template') or 'none'}`"]
    for old in rec.get("earlier") or []:
        changed = differences(old, rec)
        if changed:
            lines.append(f"- resumed from a start under other packages: {', '.join(changed)}")
    return lines
