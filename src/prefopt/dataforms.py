"""The ways other tools name a config's data, read into train and eval `DatasetSource` lists.

    train, evals, notes = read_data("c.yaml", raw)

- alignment-handbook `dataset_mixer: {id: share}` with `dataset_splits` (+ `dataset_configs`);
- alignment-handbook `dataset_mixture: {datasets: [{id, config, split, columns, weight}]}`;
- TRL's `datasets: [{path, name, data_dir, data_files, split, columns, fraction}]` (and prefopt's
  own `keep_fraction`, so that a resolved config loads back);
- `dataset_name` (+ `dataset_config`, `dataset_train_split`, `dataset_test_split`).

In the first three, a split named like an evaluation split (test, valid, eval) is held out for
evaluation. `dialects.check_spellings` has refused two forms in one place already.
"""

from .dialects import DATASET_COMPANIONS, DATASET_FORMS
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
    elif form is not None:
        sources, note = READERS[form](where, raw)
        for src in sources:
            # alignment-handbook's rule, widened: a split named like an evaluation split is held out
            is_eval = any(tag in src.split for tag in ("test", "valid", "eval"))
            (evals if is_eval else train).append(src)
        notes.append(note)
    for companion in ("dataset_splits", "dataset_configs"):
        if companion in raw and "dataset_mixer" not in raw:
            _fail(where, f"{companion} only goes with dataset_mixer.")
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


def _datasets(where: str, raw: dict) -> tuple[list[DatasetSource], str]:
    entries = raw["datasets"]
    if not isinstance(entries, list) or not entries:
        _fail(where, "datasets must be a list of {path, name, data_dir, data_files, split, columns, fraction}.")
    # `keep_fraction` (prefopt's own) is the handbook's per-dataset share, so a resolved
    # config written by prefopt loads back; `fraction` keeps TRL's mixture-share meaning.
    allowed = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction", "keep_fraction"}
    sources = []
    for i, d in enumerate(entries):
        if not isinstance(d, dict) or "path" not in d or set(d) - allowed:
            _fail(where, f"datasets[{i}]: needs 'path'; allowed keys {sorted(allowed)}.")
        sources.append(DatasetSource(
            path=str(d["path"]), split=d.get("split", "train"), name=d.get("name"), data_dir=d.get("data_dir"),
            data_files=d.get("data_files"), columns=d.get("columns"),
            mix_share=checked(where, "fraction", d.get("fraction"), label=f"datasets[{i}].fraction"),
            keep_fraction=checked(where, "keep_fraction", d.get("keep_fraction"), label=f"datasets[{i}].keep_fraction")))
    return sources, "data: TRL datasets list"


def _dataset_name(raw: dict) -> tuple[list[DatasetSource], list[DatasetSource]]:
    path, name = str(raw["dataset_name"]), raw.get("dataset_config")
    train = [DatasetSource(path=path, split=raw.get("dataset_train_split", "train"), name=name)]
    evals = [DatasetSource(path=path, split=raw["dataset_test_split"], name=name)] if "dataset_test_split" in raw else []
    return train, evals


READERS = {"dataset_mixer": _mixer, "dataset_mixture": _mixture, "datasets": _datasets}
