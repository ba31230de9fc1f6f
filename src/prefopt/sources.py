"""Where rows come from: one source read, its columns chosen and mapped; sources mixed; rows held out.

    part = load_source(src, data.column_mapping, train=True)   # a local file or folder, or a Hub dataset
    parts = mix(sources, parts)                                 # TRL's `fraction`
    train, held_out = hold_out(train, data.test_split_size, seed)

Out (`load_source`): the source's `chosen`, `rejected` and, if it has one, `prompt` (after
`column_mapping`), their values as read — `rows.normalise` checks them next — plus `source` (str,
"path[split]", named in every message) and `row` (int, the row's index in that source after
`keep_fraction`). LLaMA-Factory's ranking rows (sharegpt or alpaca: the source's `format`, or
sharegpt detected from its columns) are first read as prompt/chosen/rejected message lists
(`llamafactory`), then mapped like any others. Other columns are dropped: nothing downstream reads
them, and sources with different extra columns could not be concatenated. CSV cells are read as the text written in them.
`mix` and `hold_out` select rows and keep the columns as they are. A file that cannot be read is
refused naming it (and the line, in JSON Lines); a held-out share of less than one pair is refused.
"""

import codecs
import csv
import json
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from . import llamafactory
from .config import DatasetSource
from .errors import MissingSplit, PrefoptError
from .rows import PAIR, SCHEMAS, short

LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_source(src: DatasetSource, mapping: dict[str, str] | None, train: bool) -> Dataset:
    """One source's split: its `columns`, its `keep_fraction` (train only), mapped and tagged."""
    label = f"{src.path}[{src.split}]"
    ds = _selected(src, mapping, train, label)
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise PrefoptError(
            f"{label}: no {' or '.join(missing)} column (columns found: {ds.column_names}). Accepted schemas: "
            f"{SCHEMAS}. If your columns have other names, map them, e.g. "
            "`column_mapping: {prompt: question, chosen: good_answer, rejected: bad_answer}`."
        )
    ds = ds.select_columns([c for c in PAIR if c in ds.column_names])
    return ds.add_column("source", [label] * len(ds)).add_column("row", list(range(len(ds))))


def load_prompts(src: DatasetSource, mapping: dict[str, str] | None) -> tuple[str, Dataset]:
    """One source's prompts for `prefopt pairs`: (its label, its rows with every column, after
    `columns`, `keep_fraction` and `column_mapping`); a source without a `prompt` column is refused."""
    label = f"{src.path}[{src.split}]"
    ds = _selected(src, mapping, True, label)
    if "prompt" not in ds.column_names:
        raise PrefoptError(f"{label}: no prompt column (columns found: {ds.column_names}); prefopt pairs reads "
                           "prompts (text or chat messages) from `prompt`. If yours has another name, map it, e.g. "
                           "`column_mapping: {prompt: question}`.")
    return label, ds


def _selected(src: DatasetSource, mapping: dict[str, str] | None, train: bool, label: str) -> Dataset:
    ds = _read(src)
    if src.columns is not None:
        missing = [c for c in src.columns if c not in ds.column_names]
        if missing:
            raise PrefoptError(f"{label}: columns {missing} are listed in `columns` but the dataset has only "
                               f"{ds.column_names}; fix the `columns` list.")
        ds = ds.select_columns(src.columns)
    if train and src.keep_fraction is not None:
        # alignment-handbook's dataset_mixer: the first int(f·n) rows, not a random sample
        ds = ds.select(range(int(src.keep_fraction * len(ds))))
    fmt = llamafactory.layout(src.format, ds.features)
    if fmt is not None:
        ds = llamafactory.convert(ds, fmt, label)
    return _map_columns(ds, mapping or {}, label)


def _map_columns(ds: Dataset, mapping: dict[str, str], label: str) -> Dataset:
    """Rename the user's columns to prompt/chosen/rejected, all at once (so swaps work)."""
    renames = {}
    for target, column in mapping.items():
        if column in ds.column_names:
            renames[column] = target
        elif target not in ds.column_names:
            raise PrefoptError(f"{label}: column_mapping takes {target} from column '{column}', which this dataset "
                               f"does not have (columns found: {ds.column_names}); fix the mapping.")
    renames = {c: t for c, t in renames.items() if c != t}
    # A column already named like a target is replaced: the mapping says which column that role is.
    replaced = [t for t in renames.values() if t in ds.column_names and t not in renames]
    return ds.remove_columns(replaced).rename_columns(renames)


def _read(src: DatasetSource) -> Dataset:
    """The requested split of a local file, a local folder, or a Hub dataset."""
    path = Path(src.path).expanduser()
    if path.is_file():
        return _read_file(path, src)
    if path.is_dir():
        return _read_folder(path, src)
    if path.suffix.lower() in LOADERS or src.path.startswith(("/", ".", "~")):
        raise PrefoptError(f"{src.path}: no such file or folder; fix the dataset path.")
    return _read_hub(src)


def _builder(path: Path) -> str:
    if path.suffix.lower() not in LOADERS:
        raise PrefoptError(f"{path}: unsupported file type '{path.suffix}'; give a {', '.join(LOADERS)} file, a "
                           "folder (save_to_disk, or data files named after their split) or a Hub dataset id.")
    return LOADERS[path.suffix.lower()]


def _read_file(path: Path, src: DatasetSource) -> Dataset:
    builder = _builder(path)
    if src.split != "train":  # a single file is one split, named train
        raise _missing_split(src, ["train"])
    return _load_local(src, builder, data_files=str(path), split="train")


def _read_folder(path: Path, src: DatasetSource) -> Dataset:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        saved = load_from_disk(str(path))
        return _pick_split(saved if isinstance(saved, DatasetDict) else {"train": saved}, src)
    if src.data_dir is None and src.data_files is None:
        # `test_prefs.parquet` is split test_prefs: datasets' own split inference would miss it
        named = sorted(f for f in path.iterdir() if f.stem == src.split and f.suffix.lower() in LOADERS)
        if len(named) > 1:
            raise PrefoptError(f"{path}: {len(named)} files for split '{src.split}' ({', '.join(f.name for f in named)}); "
                               "keep one of them.")
        if named:
            return _load_local(src, _builder(named[0]), data_files=str(named[0]), split="train")
    return _pick_split(_load_local(src, str(path), data_dir=src.data_dir, data_files=src.data_files), src)


def _load_local(src: DatasetSource, builder: str, **kwargs):
    json_file = Path(kwargs["data_files"]) if builder == "json" else None
    if json_file is not None:
        _check_json(json_file, parse=False)
    if builder == "csv":
        kwargs.update(_csv_as_text(Path(kwargs["data_files"])))
    try:
        return load_dataset(builder, **kwargs)
    except (DatasetGenerationError, OSError, ValueError) as e:
        if json_file is not None:
            _check_json(json_file, parse=True)  # names the line, when one is at fault
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # datasets' words for a split without rows
            raise _no_rows(kwargs["data_files"]) from None
        kind = builder if builder in LOADERS.values() else ", ".join(LOADERS)
        raise PrefoptError(f"{json_file or src.path}: could not be read ({type(cause).__name__}: {cause}); check "
                           f"that it is a complete, valid {kind} file (export it again if it was cut short).") from e


def _csv_as_text(path: Path) -> dict:
    """load_dataset options that read every column of a CSV as the text written in it. A CSV has
    no types: pandas would read a column of `007`, `12` as the ints 7, 12, and `NA`, `null` or a
    blank cell as missing. So a blank answer is "", dropped and counted like a blank JSON answer."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # the load itself then fails, and says so
    if not header or len(set(header)) < len(header):
        return {}  # no rows, or a repeated column name: left to the load's own message
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def _check_json(path: Path, parse: bool):
    """Refuse, naming the line, a JSON file that datasets' reader would crash on or report vaguely.

    A JSON document over several lines (an array; in a .json file, also an object) is left to the
    reader. In JSON Lines, every non-blank line must be UTF-8 and an object: a top-level `null`
    line crashes pyarrow's reader (a segfault, not an exception), so this cheap check runs before
    loading; `parse` also parses each line, to name the one a failed load tripped on.
    """
    rows = 0
    try:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                text = (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line).strip()
                if not text:
                    continue
                if not rows and (text.startswith(b"[") or path.suffix.lower() == ".json"
                                 and text.startswith(b"{") and _json_line_problem(text, parse=True)):
                    return
                rows += 1
                problem = _json_line_problem(text, parse)
                if problem:
                    raise PrefoptError(f"{path} line {number}: {problem}. JSON Lines hold one object per line, "
                                       '{"prompt": ..., "chosen": ..., "rejected": ...}; fix or remove that line.')
    except OSError as e:
        raise PrefoptError(f"{path}: cannot be read ({e.strerror}); check that it is a readable file.") from None
    if not rows:
        raise _no_rows(path)


def _json_line_problem(line: bytes, parse: bool) -> str | None:
    """Why a line of JSON Lines is not an object; without `parse`, UTF-8 text that starts like one
    passes (pyarrow reads invalid UTF-8 into string columns unchecked)."""
    try:
        text = line.decode("utf-8")
        value = json.loads(text, parse_int=_int64) if parse or not text.startswith("{") else {}
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    except ValueError as e:  # from _int64
        return str(e)
    return None if isinstance(value, dict) else f"not a JSON object but {short(value)}"


def _int64(digits: str) -> int:
    """A JSON integer, if the reader can hold it (it stops at 64 bits without saying where)."""
    if not -2**63 <= int(digits) < 2**63:
        raise ValueError(f"the integer {digits} does not fit in 64 bits")
    return int(digits)


def _no_rows(path) -> PrefoptError:
    return PrefoptError(f"{path}: the file holds no rows; give a file with preference pairs in it.")


def _read_hub(src: DatasetSource) -> Dataset:
    try:
        return load_dataset(src.path, src.name, split=src.split, data_dir=src.data_dir, data_files=src.data_files)
    except Exception as e:  # network, authentication, unknown id/config/split: all reported the same way
        raise PrefoptError(
            f"{src.path}: could not be loaded from the Hugging Face Hub as split '{src.split}' "
            f"({type(e).__name__}: {e}). Check the dataset id, its config name and the split, or give a local file "
            f"({', '.join(LOADERS)}) or folder instead."
        ) from e


def _pick_split(splits, src: DatasetSource) -> Dataset:
    if src.split not in splits:
        raise _missing_split(src, list(splits))
    return splits[src.split]


def _missing_split(src: DatasetSource, found: list[str]) -> MissingSplit:
    return MissingSplit(
        f"{src.path}: no split '{src.split}' (splits found: {', '.join(found)}). Ask for one of those, or hold "
        "part of train out for evaluation instead, e.g. `dataset_splits: [train]` with `test_split_size: 0.1`.",
        src.path, src.split, found,
    )


def mix(sources: list[DatasetSource], parts: list[Dataset]) -> list[Dataset]:
    """TRL's `fraction`: shares normalised to 1; the largest mixture that oversamples no source."""
    shares = [s.mix_share for s in sources]
    if all(s is None for s in shares):
        return parts
    if any(s is None for s in shares) or any(s < 0 for s in shares) or sum(shares) == 0:
        raise PrefoptError(f"fraction is {shares} across {[f'{s.path}[{s.split}]' for s in sources]}; set a "
                           "non-negative fraction for every dataset of the mixture (not all zero), or for none.")
    weights = [s / sum(shares) for s in shares]
    total = min(len(p) / w for p, w in zip(parts, weights) if w > 0)
    return [p.select(range(round(w * total))) for p, w in zip(parts, weights)]


def hold_out(train: Dataset, size: float, seed: int) -> tuple[Dataset, Dataset]:
    """`size` of train's rows held out: a share below 1, or a whole row count of 1 or more.

    A share that asks for less than one row is refused: no pair would be held out at that share,
    and datasets would round it up to one (more than the share of train, and an evaluation of one
    pair), neither of which is what was asked; a row count says exactly what is wanted.
    """
    n = len(train)
    if size >= 1 and size != int(size):
        raise PrefoptError(f"test_split_size {size:g}: a value of 1 or more is a number of pairs to hold out, so it "
                           "must be whole; give a whole number, or a share below 1.")
    if 0 < size < 1 and size * n < 1:
        raise PrefoptError(
            f"test_split_size {size:g} of {n} training pairs asks for {size * n:.2g} of a pair, less than one, so no "
            f"pair is held out for evaluation at that share. Give a share of at least 1/{n}, a number of pairs "
            "(test_split_size: 1 or more), or remove test_split_size to train without a held-out split."
        )
    test_size = int(size) if size >= 1 else size
    try:
        split = train.train_test_split(test_size=test_size, seed=seed)
    except ValueError as e:
        raise PrefoptError(f"test_split_size {size:g} cannot be held out of {len(train)} training rows ({e}); "
                           "use a share in (0, 1) or a smaller row count.") from e
    return split["train"], split["test"]
