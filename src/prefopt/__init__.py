"""prefopt: train causal language models on preference pairs with reference-free objectives
(SimPO, CPO, CPO-SimPO, ORPO, AlphaPO, SimPER, RePO) from one YAML file — or from Python:

    import prefopt
    result = prefopt.train("simpo.yaml", learning_rate=5e-7)

The functions (`api`) load on first use, so `import prefopt` stays light."""

__version__ = "0.1.0"

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
