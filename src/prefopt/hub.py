"""A finished run, uploaded to the Hugging Face Hub: `push_to_hub: true`, or afterwards

    prefopt push OUTPUT_DIR --repo_id me/my-model [--private true] [--revision BRANCH]

prefopt pushes once, at the end of the run, with huggingface_hub's `create_repo` and
`upload_folder`, and the Trainer never does: its own push would create the repository when the
Trainer is built, upload every checkpoint, and replace README.md with transformers' card. So
`hub_strategy` is read as `end` (said when it asks for checkpoints); `hub_model_id`, `hub_token`,
`hub_private_repo` and `hub_revision` are honoured.

What is uploaded: the run's own files (its manifest's list) that make up the model and its record —
weights or adapter, config, generation config, tokenizer and chat template, README.md (the card,
rendered again to name the repository), plots/, prefopt_config.yaml, data_report.json,
metrics.jsonl, eval_generations.jsonl and prefopt_provenance.json. Never checkpoints, the lock,
prefopt_run.json (this folder's bookkeeping), training_args.bin (a pickle), TensorBoard's runs/,
or any file of the user's.
"""

from __future__ import annotations

from pathlib import Path

from . import manifest, modelcard
from .errors import PrefoptError

NOT_UPLOADED = {manifest.MANIFEST, manifest.LOCK, "training_args.bin", "runs"}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def upload_patterns(out: Path) -> list[str]:
    """The run's files to upload, as `upload_folder` patterns (a folder: everything in it)."""
    names = manifest.read_manifest(out).get("files", [])
    patterns = []
    for name in sorted(n for n in names if n not in NOT_UPLOADED and (out / n).exists()):
        patterns.append(f"{name}/*" if (out / name).is_dir() else name)
    return patterns


def check_pushable(out: Path):
    """Refuse a folder that holds no finished prefopt run, before anything is sent."""
    if not out.is_dir():
        raise PrefoptError(f"prefopt push: {out} is not a folder; name a run's output_dir.")
    run = manifest.read_manifest(out)
    if not run:
        raise PrefoptError(f"prefopt push: {out} holds no prefopt run ({manifest.MANIFEST} is missing); name the "
                           "output_dir of a `prefopt train` run.")
    if not run.get("finished"):
        raise PrefoptError(f"prefopt push: the run in {out} has not finished (its final model is not saved). Run its "
                           "`prefopt train` command again to finish it, then push.")
    if not any((out / name).is_file() for name in WEIGHTS):
        raise PrefoptError(f"prefopt push: {out} holds no saved weights ({', '.join(WEIGHTS)}); nothing to push.")


def _load_run_config(out: Path):
    from .config import load_config

    path = out / manifest.CONFIG_FILE
    if not path.is_file():
        raise PrefoptError(f"prefopt push: {path} is missing; the card cannot say how the model was trained.")
    return load_config(str(path), ["--output_dir", str(out)])


def push(out: str | Path, repo_id: str, cfg=None, token: str | None = None, private: bool | None = None,
         revision: str | None = None, api=None, log=print) -> str:
    """Upload the run in `out` to the model repository `repo_id` (created if it does not exist), its
    card first rendered again to name the repository. `cfg`: the run's config (read from its
    prefopt_config.yaml when not given); `api`: an `HfApi` (default: one for HF_ENDPOINT). Returns
    the commit's URL. A refusal from the Hub is a PrefoptError naming the repository."""
    from huggingface_hub import HfApi

    out = Path(out)
    check_pushable(out)
    if not modelcard.HUB_ID.fullmatch(repo_id or "") or ".." in repo_id:
        raise PrefoptError(f"prefopt push: repo_id {repo_id!r} is not a repository name; give NAME or OWNER/NAME "
                           "(letters, digits, '-', '_', '.').")
    cfg = cfg if cfg is not None else _load_run_config(out)
    api = api if api is not None else HfApi()
    url = _ask_hub(repo_id, out, lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=True))
    full_id = getattr(url, "repo_id", None) or repo_id
    modelcard.write_card(cfg, out, repo_id=full_id, log=log)
    if revision:
        _ask_hub(repo_id, out, lambda: api.create_branch(full_id, branch=revision, token=token, exist_ok=True))
    commit = _ask_hub(repo_id, out, lambda: api.upload_folder(
        repo_id=full_id, folder_path=str(out), allow_patterns=upload_patterns(out), revision=revision, token=token,
        commit_message="prefopt: the trained model, its card and its record"))
    where = getattr(commit, "commit_url", None) or str(commit)
    log(f"prefopt: pushed {out} to {full_id}: {where}")
    return where


def _ask_hub(repo_id: str, out: Path, call):
    """One call to the Hub; what goes wrong is a PrefoptError naming the repository and the fix."""
    import huggingface_hub.errors as hub_errors

    # the HTTP client's own error (a refused connection, a timeout); the Hub's answers are HfHubHTTPError
    transport = getattr(hub_errors, "HTTPError", OSError)
    try:
        return call()
    except hub_errors.HfHubHTTPError as e:
        raise PrefoptError(f"prefopt push: the Hub refused {repo_id}: {str(e).splitlines()[0]}. Check the token "
                           "(HF_TOKEN, or hub_token) and that it may write there.") from None
    except ValueError as e:  # the Hub found README.md's header invalid
        raise PrefoptError(f"prefopt push: {repo_id}: {str(e).splitlines()[0] if str(e) else e!r}; nothing was "
                           f"uploaded. Check {out / modelcard.CARD}'s YAML header.") from None
    except (OSError, transport) as e:
        raise PrefoptError(f"prefopt push: could not reach the Hub for {repo_id}: {e}. The run is saved in {out}; "
                           f"push it later with `prefopt push {out} --repo_id {repo_id}`.") from None


def push_after_run(cfg, log=print):
    """`push_to_hub: true` at the end of a finished run (first process only)."""
    t = cfg.training
    out = Path(t.output_dir)
    strategy = str(getattr(t.hub_strategy, "value", t.hub_strategy))
    if strategy in ("checkpoint", "all_checkpoints"):
        log(f"prefopt: hub_strategy {strategy}: prefopt pushes the finished run once, at its end, not its "
            "checkpoints.")
    repo_id = t.hub_model_id or out.resolve().name
    try:
        push(out, repo_id, cfg=cfg, token=t.hub_token, private=t.hub_private_repo, revision=t.hub_revision, log=log)
    except PrefoptError as e:
        raise PrefoptError(f"the run finished and is saved in {out}, but pushing it failed: {e}") from None
