"""The datasets-cache key of every `map` the data modules run.

    ds.map(fn, batched=True, new_fingerprint=fingerprint(ds, "tokenize", Hasher.hash(tokenizer), options))

datasets keys a map by the mapped function alone, not by the helpers it calls, so a changed
helper would silently reuse columns computed by older code (a run in a folder tokenized by older
code failed on a missing column). The key is the input's fingerprint, the source of every data
module and the map's own options. The data modules (`DATA_MODULES`) are every prefopt module reached
from `data` by following its imports, without following `config` (its values enter the keys as
options) or `errors`; `tests/test_data_prepare.py` fails when one is missing from the list.
"""

import hashlib
from pathlib import Path

from datasets import Dataset
from datasets.fingerprint import Hasher

DATA_MODULES = ("data", "sources", "llamafactory", "rows", "templates", "tokens", "report", "fingerprint")


def source_hash(folder: Path = Path(__file__).parent) -> str:
    """One hash of the source of every module in `DATA_MODULES`, read from `folder`; each file is
    hashed on its own, so moving lines from one module to the next changes it too."""
    digests = [name.encode() + hashlib.sha1((folder / f"{name}.py").read_bytes()).digest() for name in DATA_MODULES]
    return hashlib.sha1(b"".join(digests)).hexdigest()


SOURCE = source_hash()


def fingerprint(ds: Dataset, *parts) -> str:
    """The cache key of a map over `ds`: its input, the data modules' source, and `parts` (the map's options)."""
    return Hasher.hash((ds._fingerprint, SOURCE, parts))
