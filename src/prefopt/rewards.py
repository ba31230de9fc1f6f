"""Scorers for generated answers: a reward model, or a Python function (verifiable tasks).

`prefopt pairs` samples several answers per prompt and keeps the best and worst by score;
`prefopt eval --reward_model` judges generations with the same `RewardModel`.

    scorer = load_scorer(None, "checks.py:score", search_paths=[config_dir])
    scorer.score([ScoreItem(prompt, answer, row, "data.jsonl[train] row 17")])  # -> [1.0]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2.exceptions import TemplateError

from .errors import PrefoptError

SET_ONE = ("set one of `reward_model: PATH` (a sequence-classification reward model: folder or Hub id) or "
           "`reward_function: module:function` (a Python function called as fn(prompt, answer, row))")


@dataclass
class ScoreItem:
    """One answer to score: the row's prompt (text or chat messages), the answer's text, the row's
    columns (after column_mapping) and how to name it in messages."""

    prompt: str | list[dict]
    answer: str
    row: dict
    where: str


class Scorer:
    """Turns answers into one finite float each; higher is better."""

    name: str = "scorer"

    def score(self, items: list[ScoreItem]) -> list[float]:
        raise NotImplementedError


def load_scorer(reward_model: str | None, reward_function: str | None, *, trust_remote_code: bool = False,
                batch_size: int = 8, device=None, search_paths: list[str] = ()) -> Scorer:
    """The scorer the config names: exactly one of a reward model or a reward function."""
    if reward_model and reward_function:
        raise PrefoptError(f"both reward_model ({reward_model}) and reward_function ({reward_function}) are set; "
                           f"{SET_ONE}, not both.")
    if reward_function:
        return RewardFunction(reward_function, search_paths=search_paths)
    if reward_model:
        return RewardModel(reward_model, trust_remote_code=trust_remote_code, batch_size=batch_size, device=device)
    raise PrefoptError(f"no scorer for the answers: {SET_ONE}.")


# -- reward function ----------------------------------------------------------------------------

class RewardFunction(Scorer):
    """A Python function `fn(prompt, answer, row) -> number`, named `module:function` or
    `path/to/file.py:function`; called once per answer, in order.

    For verifiable tasks: a maths answer checked against the row's `answer`, code run against tests.
    A bool counts as 1.0/0.0; anything else that is not a real number, or is NaN/inf, is refused.
    """

    def __init__(self, spec: str, search_paths: list[str] = ()):
        self.spec = spec
        self.name = f"function {spec}"
        self.fn = _load_function(spec, [str(p) for p in search_paths])

    def score(self, items: list[ScoreItem]) -> list[float]:
        return [self._one(item) for item in items]

    def _one(self, item: ScoreItem) -> float:
        try:
            value = self.fn(item.prompt, item.answer, item.row)
        except Exception as e:  # noqa: BLE001 (the user's code: any failure is reported with the item)
            raise PrefoptError(
                f"{item.where}: reward function {self.spec} raised {type(e).__name__}: {e} (answer: "
                f"{_clip(item.answer)}). Fix the function, or have it return a low score for answers it cannot "
                "judge.") from None
        number = as_number(value)
        if number is None:
            raise PrefoptError(
                f"{item.where}: reward function {self.spec} returned {_clip(value)} ({type(value).__name__}), not a "
                "number; return a float, int or bool for every answer.")
        if not math.isfinite(number):
            raise PrefoptError(
                f"{item.where}: reward function {self.spec} returned {number}; return a finite number for every "
                "answer (e.g. 0.0 for one it cannot judge).")
        return number


def as_number(value) -> float | None:
    """`value` as a float if it is a real number (bool, int, float, a numpy or 0-d torch number), else None."""
    if isinstance(value, (bool, numbers.Real)):  # numpy's ints and floats register as numbers.Real
        return float(value)
    if isinstance(value, torch.Tensor):
        ok = value.ndim == 0 and not value.dtype.is_complex
        return float(value) if ok else None
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy bool_ and 0-d arrays
    if kind in ("b", "i", "u", "f") and getattr(value, "shape", None) == ():
        return float(value)
    return None


def _clip(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _load_function(spec: str, search_paths: list[str]):
    """Import `module:function` (or `file.py:function`) with the search paths and the cwd on sys.path."""
    target, colon, attr = spec.rpartition(":")
    if not colon or not target or not attr.isidentifier():
        raise PrefoptError(f"reward_function: {spec!r} is not `module:function` (e.g. `my_rewards:score`, or "
                           "`path/to/file.py:score`); write the module, a colon, then the function's name.")
    roots = [*search_paths, os.getcwd()]
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(spec, target, roots) if is_file else _import_module(spec, target, roots)
    fn = getattr(module, attr, None)
    where = f"{target}" + (f" ({module.__file__})" if getattr(module, "__file__", None) and not is_file else "")
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise PrefoptError(f"reward_function: {spec}: {where} has no `{attr}`"
                           + (f" (its functions: {', '.join(found[:10])})" if found else "")
                           + "; name a function it defines after the colon.")
    if not callable(fn):
        raise PrefoptError(f"reward_function: {spec}: `{attr}` in {where} is a {type(fn).__name__}, not a function; "
                           "name a function called as fn(prompt, answer, row).")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise PrefoptError(f"reward_function: {spec}: `{attr}{inspect.signature(fn)}` cannot be called as "
                           "fn(prompt, answer, row); give it those three parameters.") from None
    except ValueError:  # no signature to read (some builtins): the call itself will tell
        pass
    return fn


class _OnPath:
    """Puts folders at the front of sys.path for the duration of an import, then takes them out."""

    def __init__(self, folders: list[str]):
        self.folders = [str(Path(f).resolve()) for f in folders]

    def __enter__(self):
        self.added = [f for f in dict.fromkeys(self.folders) if f not in sys.path]
        sys.path[:0] = self.added

    def __exit__(self, *exc):
        for folder in self.added:
            if folder in sys.path:
                sys.path.remove(folder)


def _import_module(spec: str, name: str, roots: list[str]):
    if not all(part.isidentifier() for part in name.split(".")):
        raise PrefoptError(f"reward_function: {spec}: {name!r} is not a module name; write `module:function` or "
                           "`path/to/file.py:function`.")
    with _OnPath(roots):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise PrefoptError(
                    f"reward_function: {spec}: no module named {name!r} (looked in {', '.join(roots)} and the "
                    f"installed packages). Put {name.split('.')[0]}.py beside the config file, or name the file: "
                    "`path/to/file.py:function`.") from None
            raise _import_failed(spec, e) from None
        except Exception as e:  # noqa: BLE001 (the user's module failed while importing)
            raise _import_failed(spec, e) from None


def _import_file(spec: str, target: str, roots: list[str]):
    path = Path(target).expanduser()
    candidates = [path] if path.is_absolute() else [Path(r) / path for r in roots]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise PrefoptError(f"reward_function: {spec}: no file {target} (looked in "
                           f"{', '.join(str(c.parent) for c in candidates)}); give the path to a .py file, relative "
                           "to the config file's folder or absolute.")
    found = found.resolve()
    name = "_prefopt_reward_" + "".join(c if c.isalnum() else "_" for c in str(found))
    module_spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so that the module's own dataclasses, pickling etc. can find it
    with _OnPath([str(found.parent), *roots]):
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            del sys.modules[name]
            raise _import_failed(spec, e) from None
    return module


def _import_failed(spec: str, e: Exception) -> PrefoptError:
    hint = " (a package it needs: install it)" if isinstance(e, ModuleNotFoundError) else ""
    return PrefoptError(f"reward_function: {spec}: importing it raised {type(e).__name__}: {e}{hint}; fix the "
                        "module so that it imports.")


# -- reward model -------------------------------------------------------------------------------

def conversation(prompt: str | list[dict], answer: str) -> list[dict]:
    """The prompt's messages (a text prompt: one user message) followed by the answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": answer}]


def render(tokenizer, prompt: str | list[dict], answer: str) -> tuple[str, bool]:
    """The text the reward model reads, and whether its chat template made it (the template then
    carries the special tokens; plain text gets the tokenizer's own)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation(prompt, answer), tokenize=False), True
    if isinstance(prompt, str):
        return prompt + answer, False
    return "\n".join(m["content"] for m in conversation(prompt, answer)), False


SANE_MAX_LENGTH = 10**7  # above this, model_max_length is transformers' "unset" placeholder


class RewardModel(Scorer):
    """A sequence-classification reward model (`AutoModelForSequenceClassification`, one output):
    the score of an answer is the head's output at the conversation's last token.

    The conversation (prompt messages, a text prompt as one user message, then the answer as the
    assistant's turn) is rendered with the reward model's own chat template; a tokenizer without one
    gets the text prompt and the answer concatenated (chat messages: their contents joined by "\\n").
    Batches of `batch_size` are right-padded with the config's pad_token_id (set from the tokenizer's
    pad, else eos, where the config has none: the head finds the last token by it). Texts longer
    than the tokenizer's model_max_length (else max_position_embeddings) are truncated and counted
    in `truncated`. Remote-code models (ArmoRM-style, `output.score`) need trust_remote_code.
    """

    def __init__(self, path: str, *, trust_remote_code: bool = False, batch_size: int = 8, device=None):
        from transformers import AutoModelForSequenceClassification

        self.path, self.name, self.batch_size = str(path), f"reward model {path}", max(1, int(batch_size))
        self.trust_remote_code, self.truncated = trust_remote_code, 0
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = self._config()
        self.tokenizer = self._tokenizer()
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path, use_safetensors=True, trust_remote_code=trust_remote_code).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise PrefoptError(f"reward_model: could not load a sequence-classification model from {self.path!r}: "
                               f"{str(e).splitlines()[0]}") from None
        self._set_pad()
        tok_max = getattr(self.tokenizer, "model_max_length", None) or 0
        self.max_length = (tok_max if 0 < tok_max < SANE_MAX_LENGTH
                           else getattr(config, "max_position_embeddings", None))
        if config.num_labels != 1:
            self._check_score_output(config.num_labels)

    def _config(self):
        from transformers import AutoConfig, PretrainedConfig

        from .config import ModelArgs
        from .models import check_weights_format

        check_weights_format(ModelArgs(model_name_or_path=self.path), "reward_model")
        try:
            raw, _ = PretrainedConfig.get_config_dict(self.path)  # the file as written: no code runs
            if raw.get("auto_map") and not self.trust_remote_code:
                raise PrefoptError(
                    f"reward_model: {self.path} ships its own model code (auto_map in config.json: "
                    f"{', '.join(raw['auto_map'])}). Set `reward_trust_remote_code: true` to run it, only if you "
                    "trust the repository.")
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as e:
            raise PrefoptError(f"reward_model: could not read a model config from {self.path!r}: "
                               f"{str(e).splitlines()[0]} Give a local folder or Hub id of a reward model.") from None
        if config.num_labels != 1 and not self.trust_remote_code:
            raise PrefoptError(self._one_output(config.num_labels))
        return config

    def _one_output(self, num_labels: int) -> str:
        return (f"reward_model: {self.path} has a classification head with num_labels={num_labels}, not one "
                "reward per answer; use a reward model with num_labels: 1 (a remote-code model whose output "
                "carries `score`, like ArmoRM, is read with reward_trust_remote_code: true).")

    def _tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as e:
            raise PrefoptError(f"reward_model: could not load the tokenizer from {self.path!r}: "
                               f"{str(e).splitlines()[0]} The reward model's folder must hold its tokenizer.") from None

    def _set_pad(self):
        tok, config = self.tokenizer, self.model.config
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        if config.pad_token_id is None:
            if tok.pad_token_id is None:
                raise PrefoptError(f"reward_model: {self.path}: neither the model config nor the tokenizer has a pad "
                                   "or eos token, so padded batches cannot find each answer's last token; set "
                                   "pad_token_id in its config.json.")
            config.pad_token_id = tok.pad_token_id

    def _check_score_output(self, num_labels: int):
        """A head of several labels is read only from a remote-code model's `output.score`."""
        probe = self._encode([ScoreItem("Hello", "Hi.", {}, "probe")])
        with torch.no_grad():
            output = self.model(**self._batch(probe))
        if _score_of(output) is None:
            raise PrefoptError(self._one_output(num_labels).replace(
                "(a remote-code", "(its forward output has no `score` either; a remote-code"))
        self.truncated = 0

    def _encode(self, items: list[ScoreItem]) -> list[list[int]]:
        out = []
        for item in items:
            try:
                text, templated = render(self.tokenizer, item.prompt, item.answer)
            except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
                raise PrefoptError(f"{item.where}: the reward model's chat template cannot render the conversation "
                                   f"({e}); give prompts it accepts (a template that refuses a system turn: fold the "
                                   "system message into the user's), or a reward model whose template takes them."
                                   ) from None
            limit = {"truncation": True, "max_length": self.max_length + 1} if self.max_length else {}
            ids = self.tokenizer(text, add_special_tokens=not templated, **limit)["input_ids"]
            if self.max_length and len(ids) > self.max_length:
                self.truncated += 1
                left = getattr(self.tokenizer, "truncation_side", "right") == "left"
                ids = ids[-self.max_length:] if left else ids[: self.max_length]
            out.append(ids)
        return out

    def _batch(self, rows: list[list[int]]) -> dict:
        width = max(len(r) for r in rows)
        pad = self.model.config.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def score(self, items: list[ScoreItem]) -> list[float]:
        encoded = self._encode(items)
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # like lengths batched: less padding
        scores = [0.0] * len(items)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            with torch.no_grad():
                output = self.model(**self._batch([encoded[i] for i in chunk]))
            values = _score_of(output)
            values = (output.logits[:, 0] if values is None else values.reshape(len(chunk), -1)[:, 0]).float()
            for i, value in zip(chunk, values.tolist()):
                if not math.isfinite(value):
                    raise PrefoptError(f"{items[i].where}: {self.name} gave the score {value}; check that the model "
                                       "loads in a dtype it was trained in (NaN often means fp16 overflow).")
                scores[i] = value
        return scores


def _score_of(output):
    """`output.score` where the model returns one (remote-code reward models), else None."""
    value = getattr(output, "score", None)
    if value is None and isinstance(output, Mapping):
        value = output.get("score")
    return value if isinstance(value, torch.Tensor) else None
