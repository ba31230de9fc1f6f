"""The ways other tools name a config's data, read into train and eval `DatasetSource` lists.

    train, evals, notes = read_data("c.yaml", raw)

- alignment-handbook `dataset_mixer: {id: share}` with `dataset_splits` (+ `dataset_configs`);
- alignment-handbook `dataset_mixture: {datasets: [{id, config, split, columns, weight}]}`;
- TRL's `datasets: [{path, name, data_dir, data_files, split, columns, fraction}]` (and prefopt's
  own `keep_fraction`, so that a resolved config loads back);
- `dataset_name` (+ `dataset_config`, `dataset_train_split`, `dataset_test_split`);
- LLaMA-Factory's `dataset: name1,name2` (+ `eval_dataset`, `dataset_dir`): entries of
  dataset_dir/dataset_info.json (dataset_dir defaults to `data`, relative to the working
  directory, as LLaMA-Factory reads it), each a `file_name` in dataset_dir or an `hf_hub_url`, with
  `ranking: true` (other entries are not preference data) and its `formatting`, `columns` and
  `tags`, carried to `llamafactory` as the source's `format`.

In the first three, a split named like an evaluation split (test, valid, eval) is held out for
evaluation. `data_format: sharegpt` gives every source that format (a dataset_info.json entry
saying otherwise is refused). `dialects.check_spellings` has refused two forms in one place already.
"""

import dataclasses
import difflib
import json
from pathlib import Path

from .dialects import DATASET_COMPANIONS, DATASET_FORMS
from .llamafactory import COLUMNS, FORMATTINGS, TAGS
from .schema import DatasetSource, _fail
from .values import checked


def read_data(where: str, raw: dict) -> tuple[list[DatasetSource], list[DatasetSource], list[str]]:
    """The train and eval sources of whichever form `raw` names its data in, and a note of it. The
    data keys are taken out of `raw` (a dataset_mixture's test_split_size is put in it)."""
    train, evals, notes = [], [], []
    form = next((key for key in DATASET_FORMS if key in raw), None)
    if form == "dataset_name":
        train, evals = _dataset_name(raw)
        notes.append("data: dataset_name")
    elif form == "dataset":
        train, evals, note = _llamafactory(where, raw)
        notes.append(note)
    elif form is not None:
        sources, note = READERS[form](where, raw)
        # a `datasets:` entry may say which it is (`eval: true`, as a resolved config writes it)
        said = [d.get("eval") for d in raw["datasets"]] if form == "datasets" else [None] * len(sources)
        for src, held_out in zip(sources, said):
            # alignment-handbook's rule, widened: a split named like an evaluation split is held out
            is_eval = looks_held_out(src.split) if held_out is None else held_out
            (evals if is_eval else train).append(src)
        notes.append(note)
    for companion, owner in (("dataset_splits", "dataset_mixer"), ("dataset_configs", "dataset_mixer"),
                             ("dataset_dir", "dataset"), ("eval_dataset", "dataset")):
        if companion in raw and owner not in raw:
            _fail(where, f"{companion} only goes with {owner}.")
    for sources in (train, evals):
        _stamp_format(where, raw.get("data_format"), sources, form)
    if raw.get("streaming"):
        _fail(where, "streaming datasets are not supported: prefopt tokenizes and checks every row before training.")
    for key in DATASET_FORMS + DATASET_COMPANIONS:
        raw.pop(key, None)
    return train, evals, notes


def _mixer(where: str, raw: dict) -> tuple[list[DatasetSource], str]:
    mixer = raw["dataset_mixer"]
    if not isinstance(mixer, dict) or not mixer:
        _fail(where, "dataset_mixer must map dataset names to fractions, e.g. {my/data: 1.0}.")
    splits = raw.get("dataset_splits", ["train", "test"])
    if isinstance(splits, str):
        splits = [splits]
    configs = raw.get("dataset_configs") or [None] * len(mixer)
    if len(configs) != len(mixer):
        _fail(where, f"dataset_configs has {len(configs)} entries for {len(mixer)} datasets in dataset_mixer.")
    sources = []
    for (path, frac), name in zip(mixer.items(), configs):
        frac = checked(where, "keep_fraction", frac, label=f"dataset_mixer[{path!r}]")
        if frac is None:
            _fail(where, f"dataset_mixer[{path!r}]: give the share of its rows to use, e.g. 1.0.")
        sources += [DatasetSource(path=str(path), split=split, name=name, keep_fraction=frac) for split in splits]
    return sources, f"data: alignment-handbook dataset_mixer with splits {list(splits)}"


def _mixture(where: str, raw: dict) -> tuple[list[DatasetSource], str]:
    mixture = raw["dataset_mixture"]
    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list):
        _fail(where, "dataset_mixture needs a 'datasets' list of {id, config, split, columns, weight}.")
    unknown = set(mixture) - {"datasets", "seed", "test_split_size"}
    if unknown:
        _fail(where, f"dataset_mixture: unknown keys {sorted(unknown)} (allowed: datasets, seed, test_split_size).")
    sources = []
    for i, d in enumerate(mixture["datasets"]):
        extra = set(d) - {"id", "config", "split", "columns", "weight"}
        if "id" not in d or extra:
            _fail(where, f"dataset_mixture.datasets[{i}]: needs 'id'; allowed keys id, config, split, columns, weight.")
        weight = checked(where, "keep_fraction", d.get("weight"), label=f"dataset_mixture.datasets[{i}].weight")
        sources.append(DatasetSource(path=str(d["id"]), split=d.get("split", "train"), name=d.get("config"),
                                     columns=d.get("columns"), keep_fraction=weight))
    if "test_split_size" in mixture:
        size = checked(where, "test_split_size", mixture["test_split_size"], label="dataset_mixture.test_split_size")
        raw.setdefault("test_split_size", size)
    return sources, "data: alignment-handbook dataset_mixture"


def looks_held_out(split: str) -> bool:
    """A split named like an evaluation split (test, valid, eval), which the list forms hold out."""
    return any(tag in split for tag in ("test", "valid", "eval"))


def _datasets(where: str, raw: dict) -> tuple[list[DatasetSource], str]:
    entries = raw["datasets"]
    if not isinstance(entries, list) or not entries:
        _fail(where, "datasets must be a list of {path, name, data_dir, data_files, split, columns, fraction}.")
    # `keep_fraction` (prefopt's own) is the handbook's per-dataset share, so a resolved
    # config written by prefopt loads back; `fraction` keeps TRL's mixture-share meaning.
    allowed = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction", "keep_fraction", "format",
               "eval"}
    sources = []
    for i, d in enumerate(entries):
        if not isinstance(d, dict) or "path" not in d or set(d) - allowed:
            _fail(where, f"datasets[{i}]: needs 'path'; allowed keys {sorted(allowed)}.")
        if d.get("eval") not in (None, True, False):
            _fail(where, f"datasets[{i}].eval: true (held out for evaluation) or false, got {d['eval']!r}.")
        sources.append(DatasetSource(
            path=str(d["path"]), split=d.get("split", "train"), name=d.get("name"), data_dir=d.get("data_dir"),
            data_files=d.get("data_files"), columns=d.get("columns"),
            mix_share=checked(where, "fraction", d.get("fraction"), label=f"datasets[{i}].fraction"),
            keep_fraction=checked(where, "keep_fraction", d.get("keep_fraction"), label=f"datasets[{i}].keep_fraction"),
            format=_entry_format(where, f"datasets[{i}].format", d["format"]) if d.get("format") is not None else None))
    return sources, "data: TRL datasets list"


def _dataset_name(raw: dict) -> tuple[list[DatasetSource], list[DatasetSource]]:
    path, name = str(raw["dataset_name"]), raw.get("dataset_config")
    train = [DatasetSource(path=path, split=raw.get("dataset_train_split", "train"), name=name)]
    evals = [DatasetSource(path=path, split=raw["dataset_test_split"], name=name)] if "dataset_test_split" in raw else []
    return train, evals


def _stamp_format(where: str, data_format, sources: list[DatasetSource], form: str | None):
    """`data_format: sharegpt` on every source; refused against a dataset_info.json entry's other formatting."""
    if data_format is None:
        return
    if data_format not in ("sharegpt",):
        _fail(where, f"data_format {data_format!r} is not known: use sharegpt (LLaMA-Factory's conversations with "
                     "from/value), or leave data_format out to detect the rows' format from their columns.")
    for i, src in enumerate(sources):
        if src.format is None:
            sources[i] = dataclasses.replace(src, format={"formatting": data_format})
        elif src.format["formatting"] != data_format:
            named = "dataset_info.json" if form == "dataset" else "its format"
            _fail(where, f"data_format is {data_format}, but {named} gives {src.path} formatting "
                         f"{src.format['formatting']}; keep one of them.")


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory: `dataset: name1,name2` resolved through dataset_dir/dataset_info.json

ENTRY_KEYS = {"file_name", "file_sha1", "hf_hub_url", "ms_hub_url", "script_url", "formatting", "ranking", "subset",
              "split", "folder", "columns", "tags"}
NOT_READ = {"tools": "tool descriptions", "images": "images", "videos": "videos", "audios": "audio",
            "response": "a single response (SFT rows)", "kto_tag": "KTO's labels"}


def _llamafactory(where: str, raw: dict) -> tuple[list[DatasetSource], list[DatasetSource], str]:
    """LLaMA-Factory's `dataset` (and `eval_dataset`): names of dataset_dir/dataset_info.json's
    entries; dataset_dir (default data) is relative to the working directory, as LLaMA-Factory reads it."""
    folder = raw.get("dataset_dir", "data")
    if not isinstance(folder, str) or folder == "ONLINE" or folder.startswith("REMOTE:"):
        _fail(where, f"dataset_dir {folder!r}: prefopt reads dataset_info.json from a local folder; give the folder "
                     "holding it (default: data, in the working directory).")
    info_path = Path(folder) / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _fail(where, f"{info_path}: not found; `dataset:` names entries of dataset_dir/dataset_info.json (dataset_dir "
                     "defaults to data, in the working directory): set dataset_dir to the folder that holds it.")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(where, f"{info_path}: cannot be read as JSON ({e}); fix the file.")
    if not isinstance(info, dict):
        _fail(where, f"{info_path}: holds no mapping of dataset names to entries; fix the file.")
    names = {key: _names(where, key, raw[key]) for key in ("dataset", "eval_dataset") if key in raw}
    train, evals = ([_entry(where, info_path, info, n) for n in names.get(key, [])] for key in ("dataset", "eval_dataset"))
    listed = ", ".join(names["dataset"]) + (f" (eval: {', '.join(names['eval_dataset'])})" if evals else "")
    return train, evals, f"data: LLaMA-Factory dataset {listed} from {info_path} (relative to the working directory)"


def _names(where: str, key: str, value) -> list[str]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names) or not names:
        _fail(where, f"{key} must name datasets of dataset_info.json: name1,name2 or a list of names.")
    return [n.strip() for n in names]


def _entry(where: str, info_path: Path, info: dict, name: str) -> DatasetSource:
    """One dataset_info.json entry → its DatasetSource, with the rows' format."""
    if name not in info:
        near = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
        hint = f"nearest: {', '.join(near)}" if near else f"it names {', '.join(list(info)[:10]) or 'none'}"
        _fail(where, f"dataset {name!r} is not in {info_path} ({hint}); fix the name or add an entry for it.")
    entry, label = info[name], f"{info_path}: {name}"
    if not isinstance(entry, dict) or set(entry) - ENTRY_KEYS:
        extra = sorted(set(entry) - ENTRY_KEYS) if isinstance(entry, dict) else entry
        _fail(where, f"{label}: {extra} cannot be read; an entry takes {', '.join(sorted(ENTRY_KEYS))}.")
    if entry.get("ranking") is not True:
        _fail(where, f"{label} has no \"ranking\": true, so it is not preference data (LLaMA-Factory reads it as "
                     "SFT rows); add \"ranking\": true to its entry if its rows hold chosen and rejected answers, or "
                     "name a ranking dataset.")
    # (columns always present: an entry reads only the optional columns it names, as LLaMA-Factory does)
    fmt = _entry_format(where, label, {"columns": {}, **{k: entry[k] for k in ("formatting", "columns", "tags")
                                                           if k in entry}})
    split = str(entry.get("split", "train"))
    if "hf_hub_url" in entry:
        return DatasetSource(path=str(entry["hf_hub_url"]), split=split, name=entry.get("subset"),
                             data_dir=entry.get("folder"), format=fmt)
    for key, what in (("ms_hub_url", "a ModelScope dataset"), ("script_url", "a loading script")):
        if key in entry:
            _fail(where, f"{label}: {key} ({what}) cannot be read by prefopt; give a file_name in dataset_dir or an "
                         "hf_hub_url.")
    if not isinstance(entry.get("file_name"), str):
        _fail(where, f"{label} names no file_name (nor hf_hub_url); give the file in dataset_dir that holds its rows.")
    return DatasetSource(path=str(info_path.parent / entry["file_name"]), split=split, format=fmt)


def _entry_format(where: str, label: str, d) -> dict:
    """{formatting, columns, tags} checked: known keys, string names; tags only for sharegpt (as LLaMA-Factory)."""
    if not isinstance(d, dict) or set(d) - {"formatting", "columns", "tags"}:
        _fail(where, f"{label}: the format is {{formatting, columns, tags}}, not {d!r}.")
    formatting = d.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        _fail(where, f"{label}: formatting {formatting!r}; prefopt reads LLaMA-Factory's {' and '.join(FORMATTINGS)} "
                     "ranking rows.")
    fmt = {"formatting": formatting}
    for key, known in (("columns", COLUMNS[formatting]), ("tags", TAGS if formatting == "sharegpt" else None)):
        given = d.get(key)
        if given is None or known is None:
            continue
        if not isinstance(given, dict) or not all(isinstance(v, str) or v is None for v in given.values()):
            _fail(where, f"{label}: {key} must map names to strings, e.g. {{{next(iter(known))}: ...}}.")
        for k in given:
            if k in NOT_READ and given[k] is not None:
                _fail(where, f"{label}: columns.{k}: prefopt does not train on {NOT_READ[k]}; remove it (preference "
                             "pairs are read from chosen and rejected).")
            if k not in known and k not in NOT_READ:
                _fail(where, f"{label}: {key}.{k} is not known for {formatting}; use {', '.join(known)}.")
        fmt[key] = {k: v for k, v in given.items() if v is not None and k not in NOT_READ}
    return fmt


READERS = {"dataset_mixer": _mixer, "dataset_mixture": _mixture, "datasets": _datasets}
