"""prefopt from Python — a notebook, a script, another framework: the command line's commands as
functions, with the same config keys, the same runs and the same `PrefoptError`s.

    import prefopt

    cfg = prefopt.load_config("simpo.yaml", learning_rate=5e-7)   # a path, a dict of the YAML's keys,
    print(prefopt.explain(cfg))                                   # or a Config; keys as keyword overrides
    result = prefopt.train(cfg)                                   # RunResult: output_dir, metrics, trainer
    report = prefopt.evaluate([base, result.output_dir], data="data")
    made = prefopt.pairs("onpolicy.yaml")                         # PairsResult: output (pairs.jsonl), report
    answers = prefopt.generate(result.output_dir, ["Sort: 3 1 2"], max_new_tokens=16)

`train` in a notebook: the console lines print into the cell, transformers' own notebook progress
bars replace the terminal's (its Trainer picks them when it runs in one), and a call made while an
event loop runs (Jupyter's) is an ordinary blocking call. An interrupt (the notebook's stop button
sends SIGINT) stops at the next step with a checkpoint and raises `prefopt.errors.Stopped`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PrefoptError

if TYPE_CHECKING:
    from .config import Config
    from .pipeline import RunResult


def load_config(config: str | Path | dict | Config | None = None, **overrides: Any) -> Config:
    """The resolved config: `config` is a YAML path, a dict of the same keys (any dialect the YAML
    takes), or a `Config` (returned as it is; it takes no overrides); `overrides` are `--key value`
    as keyword arguments, winning over the file's keys as on the command line.

    >>> cfg = prefopt.load_config({"method": "simpo", "output_dir": "runs/x"}, beta=2.5)
    >>> cfg.objective.beta
    2.5
    """
    return _load(config, overrides, objective_optional=False)


def _load(config, overrides: dict, objective_optional: bool) -> Config:
    from .config import Config, negated_flags, build_config
    from .config import load_config as load
    from .dialects import check_spellings, merge_overrides

    if isinstance(config, Config):
        if overrides:
            raise PrefoptError(f"load_config: a Config takes no overrides ({', '.join(overrides)}); pass its YAML "
                               "path or a dict of keys instead, or change the Config's fields.")
        return config
    if config is None or isinstance(config, (str, Path)):
        return load(str(config) if config is not None else None, _as_argv(overrides), objective_optional)
    if not isinstance(config, dict):
        raise PrefoptError(f"load_config: expected a YAML path, a dict of config keys or a Config, got "
                           f"{type(config).__name__}.")
    overrides = negated_flags(overrides)
    check_spellings("config", dict(config))
    check_spellings("keyword arguments", overrides)
    return build_config(merge_overrides(dict(config), overrides), "config", objective_optional)


def _as_argv(overrides: dict) -> list[str]:
    """Keyword overrides as the command line's `--key value`, each value as JSON, which YAML reads
    back as the same value: a string stays the string given (`run_name="007"`, `hub_model_id="on"`),
    numbers, true/false, lists and mappings their own."""
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", json.dumps(value)]
    return argv


def explain(config: str | Path | dict | Config, **overrides: Any) -> str:
    """What `prefopt config explain` prints: the objective, its formula, the settings, what was read
    as what, and where the config's own tool would have trained other values."""
    from .explanation import explain as show

    return show(load_config(config, **overrides), warnings=True)


def train(config: str | Path | dict | Config | None = None, **overrides: Any) -> RunResult:
    """Train as `prefopt train` does and return the run's `RunResult` (`output_dir`,
    `train_metrics`, `eval_metrics`, `trainer`; `finished`: the folder held this run, finished,
    and nothing was done). With neither a config nor overrides: the offline demo (its measured
    before/after numbers, as a dict)."""
    if config is None and not overrides:
        from .demo import run_demo

        return run_demo()
    from .pipeline import train as run

    return run(load_config(config, **overrides))


def pairs(config: str | Path | dict | Config, **overrides: Any):
    """What `prefopt pairs` does: the policy's sampled answers, scored, written as pairs; returns
    `PairsResult` (`output`, the pairs file; `report`, its counts and statistics as a dict)."""
    from .onpolicy import make_pairs

    return make_pairs(_load(config, overrides, objective_optional=True))


def iterate(config: str | Path | dict | Config, rounds: int, **overrides: Any) -> dict:
    """What `prefopt iterate CONFIG --rounds K` does: K rounds of pairs from the policy and training on
    them, each in output_dir/round-K/; returns what output_dir/iterate.json holds (each round's pairs,
    rewards and final metrics)."""
    from .rounds import iterate as run

    return run(load_config(config, **overrides), rounds)


def evaluate(models: str | Path | list, data: str | None = None, split: str | None = None, prompts: str | None = None,
             reward_model: str | None = None, **generation: Any) -> dict:
    """What `prefopt eval` reports, as a dict: preference metrics on held-out pairs (`data`, its
    `split`), generation metrics on `prompts` and every answer (`generations`, prompt by prompt), and
    with a reward model each answer's reward and the win rate over the first model (`split`: a
    file's only split, a folder's test unless named). `generation`: max_new_tokens, temperature,
    top_p, do_sample, seed."""
    from .evaluation import evaluate as run

    models = [models] if isinstance(models, (str, Path)) else models
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, (str, Path)) for m in models):
        raise PrefoptError(f"evaluate: models is a folder or a list of folders, got {models!r}.")
    seed = generation.pop("seed", 0)
    return run([str(m) for m in models], data=data, split=split, prompts=prompts, reward_model=reward_model,
               seed=seed, **_sampling(generation))


def generate(model: str | Path, prompts: str | list, **generation: Any) -> list[str]:
    """Answers from a saved model, with its chat template and every EOS id it has: `prompts` is one
    prompt, a list of prompts (each a string, or a conversation as a list of {role, content}).
    `generation`: max_new_tokens, temperature, top_p, do_sample, seed."""
    from transformers import set_seed

    from .evaluation import Generator

    conversations = _conversations(prompts)
    set_seed(generation.pop("seed", 0))
    generator = Generator(str(model), **_sampling(generation))
    return generator.answer(conversations, progress=len(conversations) > 1)


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _conversations(prompts) -> list[list[dict]]:
    """One prompt (a string, or a conversation: a list of {role, content}), or a list of prompts."""
    if isinstance(prompts, str) or isinstance(prompts, list) and prompts and all(map(_is_message, prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise PrefoptError(f"generate: give a prompt, a conversation or a list of them, got {prompts!r}.")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append([{"role": "user", "content": p}])
        elif isinstance(p, list) and p and all(map(_is_message, p)):
            out.append(list(p))
        else:
            raise PrefoptError(f"generate: prompt {i} is {p!r}; a prompt is a string or a list of "
                               "{role, content} messages.")
    return out


GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "do_sample")
# what each setting takes, checked before anything loads
GENERATION_TYPES = {"max_new_tokens": int, "temperature": (int, float), "top_p": (int, float), "do_sample": bool}


def _sampling(generation: dict) -> dict:
    """The generation settings, as the command line reads them (a temperature or top_p samples)."""
    unknown = [k for k in generation if k not in GENERATION_KEYS]
    if unknown:
        raise PrefoptError(f"unknown generation setting {unknown[0]!r}; use {', '.join(GENERATION_KEYS)} or seed.")
    out = {k: v for k, v in generation.items() if v is not None}
    for key, value in out.items():
        if not isinstance(value, GENERATION_TYPES[key]) or isinstance(value, bool) != (key == "do_sample"):
            raise PrefoptError(f"{key}: expected {'true or false' if key == 'do_sample' else 'a number'}, got {value!r}.")
    if "temperature" in out or "top_p" in out:
        out.setdefault("do_sample", True)
    return out
