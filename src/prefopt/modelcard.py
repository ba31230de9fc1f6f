"""output_dir/README.md: the model card, as the Hugging Face Hub reads one.

    write_card(cfg, out)                  # at the end of every run (first process)
    text = render(cfg, out, "me/model")   # before `prefopt push`: the card names the repository

A YAML header the Hub indexes, then the body:

    ---
    base_model: Qwen/Qwen2.5-0.5B-Instruct   # only a Hub id (a local folder means nothing on the Hub)
    library_name: prefopt                    # peft for a LoRA adapter: the Hub's convention for adapters
    license: apache-2.0                      # the base's, where its card is on this machine
    datasets: [HuggingFaceH4/ultrafeedback_binarized]   # the data sources that are Hub ids
    tags: [prefopt, simpo, preference-optimization]
    pipeline_tag: text-generation
    ---
    objective and formula · settings (explain) · data (data_report.json) · final metrics
    (metrics.jsonl) · plots · how to load it and chat · reproducibility (prefopt_provenance.json)

Everything but the config is read from the run's own files in `out`, so a card rendered by
`prefopt push` later says what the card written at the end of the run said. A README.md that
is not the run's own (the user's) is never overwritten: the run refuses to start beside one
(runs.py), and `write_card` checks again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from . import manifest, provenance
from .checkpoints import write_atomic
from .explanation import explain, loss_formula

CARD = manifest.CARD
# metrics that say how fast this machine was, not how the model does
TIMING = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_id(name: str | None) -> str | None:
    """`name` if it names a Hub repository (not a folder on this machine), else None."""
    if not name or Path(name).expanduser().exists() or not HUB_ID.fullmatch(name) or ".." in name:
        return None
    return name


def front_matter(text: str) -> dict:
    """A card's YAML header ({} when it has none, or it does not parse as a mapping)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(cfg) -> str | None:
    """The base model's license, from its card where that is on this machine: in its folder, or in
    the Hugging Face cache for a Hub id. Nothing is downloaded."""
    name = cfg.model.model_name_or_path
    local = Path(name).expanduser() / CARD if name else None
    path = local if local is not None and local.is_file() else None
    if path is None and hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, CARD, revision=cfg.model.model_revision or None)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return None
    try:
        found = front_matter(path.read_text(encoding="utf-8")).get("license")
    except (OSError, UnicodeDecodeError):
        return None
    return str(found) if isinstance(found, str) else None


def metadata(cfg, adapter: bool) -> dict:
    """The card's YAML header."""
    base = hub_id(cfg.model.model_name_or_path)
    # (`path: json` with data_files names a loader, not a dataset)
    datasets = list(dict.fromkeys(s.path for s in cfg.data.train_datasets + cfg.data.eval_datasets
                                  if hub_id(s.path) and not (s.data_files and "/" not in s.path)))
    tags = ["prefopt", cfg.objective.method, "preference-optimization"]
    if adapter:
        tags += ["lora"] + ([f"base_model:adapter:{base}"] if base else [])
    out = {"base_model": base, "library_name": "peft" if adapter else "prefopt", "license": base_license(cfg),
           "datasets": datasets or None, "tags": tags, "pipeline_tag": "text-generation"}
    return {k: v for k, v in out.items() if v is not None}


def _read_json_lines(path: Path) -> list[dict]:
    lines = []
    if path.is_file():
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines


def final_metrics(out: Path) -> tuple[dict, dict]:
    """The last evaluation line of metrics.jsonl (without timings) and the run's closing train line."""
    lines = _read_json_lines(out / manifest.METRICS_FILE)
    evals = [line for line in lines if "eval_loss" in line]
    ends = [line for line in lines if "train_loss" in line]
    last = {k: v for k, v in (evals[-1] if evals else {}).items() if k not in TIMING}
    return ({"step": evals[-1]["step"], **last} if evals else {}), (ends[-1] if ends else {})


def _data_section(out: Path) -> list[str]:
    try:
        report = json.loads((out / "data_report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    lines = ["## Data", "", "| split | pairs read | kept | dropped | truncated (prompt / chosen / rejected) |",
             "|---|---|---|---|---|"]
    for split, r in report.items():
        if not r:
            continue
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in r["dropped"].items() if n) or "none"
        t = r["truncated"]
        lines.append(f"| {split} | {r['rows_in']} | {r['kept']} | {dropped} | "
                     f"{t['prompt']} / {t['chosen']} / {t['rejected']} |")
    return lines + ["", "Every dropped row, by reason, and the token lengths: `data_report.json`.", ""]


def _metrics_section(out: Path) -> list[str]:
    evaluated, ended = final_metrics(out)
    if not evaluated and not ended:
        return []
    lines = ["## Results", ""]
    if ended:
        lines.append(f"Mean training loss over the run: {ended['train_loss']:.4g} ({ended.get('step')} steps).")
        lines.append("")
    if evaluated:
        lines += [f"Final evaluation (step {evaluated['step']}, held-out pairs):", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k.removeprefix('eval_')} | {v:.4g} |" for k, v in evaluated.items()
                  if k != "step" and isinstance(v, (int, float))]
        lines.append("")
    return lines + ["Every logged line: `metrics.jsonl`.", ""]


def _plots_section(out: Path) -> list[str]:
    # the overview (every quantity on one figure) first, then each quantity alone
    plots = sorted((out / "plots").glob("*.png"), key=lambda p: (p.name != "overview.png", p.name)) \
        if (out / "plots").is_dir() else []
    if not plots:
        return []
    return ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]


def _usage_section(model_ref: str, adapter: bool) -> list[str]:
    loader = (["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
               f'model = AutoPeftModelForCausalLM.from_pretrained("{model_ref}")  # the base, with this adapter']
              if adapter else
              ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
               f'model = AutoModelForCausalLM.from_pretrained("{model_ref}")'])
    return ["## Use", "", "```python", *loader,
            f'tokenizer = AutoTokenizer.from_pretrained("{model_ref}")  # with the chat template it was trained with',
            'messages = [{"role": "user", "content": "What is preference optimization?"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
            "                                       return_dict=True)",
            "output = model.generate(**inputs, max_new_tokens=256)",
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```", "", "Or chat with it from the command line:", "", "```", f"prefopt generate --model {model_ref}",
            "```", ""] + ([f"Fold the adapter into its base: `prefopt merge {model_ref} --output MERGED_DIR`.", ""]
                          if adapter else [])


def render(cfg, out: str | Path, repo_id: str | None = None) -> str:
    """The card of the run in `out`, trained as `cfg` says; `repo_id`: the repository it is pushed
    to (the loading example names it; without one, the folder)."""
    out = Path(out)
    adapter = (out / "adapter_config.json").is_file()
    o, spec, t = cfg.objective, cfg.method, cfg.training
    run = manifest.read_manifest(out)
    steps = (run.get("finished") or {}).get("step") or final_metrics(out)[1].get("step")  # (written before it ends)
    processes = run.get("processes") or 1
    base = cfg.model.model_name_or_path or "(built-in demo model)"
    what = "A LoRA adapter for" if adapter else "A fine-tune of"
    head = yaml.safe_dump(metadata(cfg, adapter), sort_keys=False, allow_unicode=True)
    lines = ["---", head.rstrip(), "---", "", f"# {repo_id or out.resolve().name}", "",
             f"{what} `{base}`, trained with prefopt on preference pairs with "
             f"{spec.title} ({o.method}, {spec.paper}).", "", "## Objective", "", "```", loss_formula(cfg), "```",
             "", "## Settings", "",
             f"Trained {steps if steps is not None else '?'} optimizer steps on {processes} process"
             f"{'es' if processes != 1 else ''}: {t.per_device_train_batch_size} pairs per device × "
             f"{t.gradient_accumulation_steps} accumulation × {processes} = "
             f"{t.per_device_train_batch_size * t.gradient_accumulation_steps * processes} pairs per step, "
             f"seed {t.seed}. The resolved objective and settings (`prefopt config explain`):", "", "```",
             explain(cfg, processes=processes), "```", "",
             "The whole resolved config is `prefopt_config.yaml`: `prefopt train prefopt_config.yaml --output_dir "
             "NEW_DIR` trains this run again.", ""]
    lines += _data_section(out) + _metrics_section(out) + _plots_section(out)
    lines += _usage_section(repo_id or str(out), adapter)
    record = provenance.card_lines(provenance.read(out))
    if record:
        lines += ["## Reproducibility", "", "Recorded in `prefopt_provenance.json`:", "", *record, ""]
    return "\n".join(lines)


def may_write(out: Path) -> bool:
    """Whether README.md in `out` is the run's to write: absent, recorded as the run's in its
    manifest and not edited since the run wrote it, or written by the final save under way (PEFT
    writes an adapter's card)."""
    path = out / CARD
    if not path.exists() and not path.is_symlink():
        return True
    run = manifest.read_manifest(out)
    if CARD in run.get("files", []):
        return not manifest.card_edited(out, run)
    saving_from = run.get("saving_from")
    return saving_from is not None and CARD not in saving_from


def write_card(cfg, out: str | Path, repo_id: str | None = None, log=print) -> bool:
    """Write the card (first process only); a README.md that is not the run's is left as it is."""
    out = Path(out)
    if not may_write(out):
        log(f"prefopt: {out / CARD} is not the card this run wrote (it is yours, or you edited it): left as it is. "
            "Move it away for prefopt to write the card again.")
        return False
    write_atomic(out / CARD, render(cfg, out, repo_id))
    manifest.record_card(out)
    return True
