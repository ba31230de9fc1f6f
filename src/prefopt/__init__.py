"""prefopt: train causal language models on preference pairs with reference-free objectives
(SimPO, CPO, CPO-SimPO, ORPO, AlphaPO, SimPER, RePO) from one YAML file — or from Python:

    import prefopt
    result = prefopt.train("simpo.yaml", learning_rate=5e-7)

The functions (`api`) load on first use, so `import prefopt` stays light."""

import os as _os

__version__ = "0.1.0"

# PyTorch's own switch (c10's CPU allocator): CPU buffers of 2 MB and more are madvise'd for
# transparent huge pages. The LM head's [rows, V] fp32 buffers are large and, on a kernel whose THP
# mode is "madvise", fault their 4 KiB pages in one by one: at V = 128k, 2,900 rows (1.5 GB), a
# fresh buffer's head matmul took 1.48-1.78 s against 1.15 s into a reused one, and 1.20 s with
# this set. PyTorch reads it once, at its first large CPU allocation, so it takes effect when
# prefopt is imported before any large tensor is made (the CLI always is); it applies to this
# process and the processes it starts. A user's own value (0 turns it off) wins; GPU memory is
# not touched.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# name → the module that defines it
_EXPORTS = {
    "train": "api", "load_config": "api", "explain": "api", "evaluate": "api", "generate": "api", "pairs": "api", "iterate": "api",
    "Config": "config", "RunResult": "pipeline", "PrefoptError": "errors", "Stopped": "errors",
    "CPOConfig": "trl", "CPOTrainer": "trl", "ORPOConfig": "trl", "ORPOTrainer": "trl",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
