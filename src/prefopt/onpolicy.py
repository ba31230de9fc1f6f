"""`prefopt pairs CONFIG.yaml`: the policy's own answers made into preference pairs (on-policy data).

    prompts ──► sample num_samples answers each (sampling: one per seed) ──► score each (rewards)
            ──► keep the best as chosen, the worst (or a random worse one) as rejected (pairselect)
            ──► output.jsonl (prompt, chosen, rejected, scores, seeds) + output.report.json

The config is a training config's: `model_name_or_path` is the policy, the data keys name the
prompts (their `prompt` column: text or messages; `chat_template` as in training), and the pairs
keys (`prefopt config keys --section pairs`) the scorer and the sampling. The file it writes is
read by `prefopt train` as it stands.

Work is done in batches of `generation_batch_size` prompts; batch b covers prompts
[b·size, (b+1)·size), and each batch's answers and scores are written to its own file in
`output.parts/` as soon as they exist (written whole or not at all). A run that is killed
resumes at its first missing batch and ends with the same file; under torchrun/accelerate the
processes take every world-size-th batch, and the file equals one process's (the batches and
their seeds are the same). The parts folder records what made it (`settings.json`: the policy,
the prompts, the sampling and the scorer); a rerun with other settings is refused, not mixed in.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import write_atomic
from .errors import PrefoptError



@dataclass
class PromptRow:
    prompt: str | list[dict]
    row: dict  # every column of the row as read
    where: str  # "path[split] row N"


@dataclass
class PairsResult:
    output: Path
    report: dict
    finished_before: bool = False  # the file was already complete: nothing was done
    lines: list[str] = field(default_factory=list)  # the printed report


# -- what the run is ------------------------------------------------------------------------------

def output_path(cfg) -> Path:
    out = Path(cfg.pairs.output) if cfg.pairs.output else Path(cfg.training.output_dir) / "pairs.jsonl"
    if out.suffix != ".jsonl":
        raise PrefoptError(f"output: {out} must end in .jsonl (the pairs are written as JSON Lines, which `prefopt "
                           "train` reads); name a .jsonl file.")
    return out


DEFAULT_SAMPLES = 5  # the SimPO recipe's five seeds


def seeds_of(cfg) -> list[int]:
    """One seed per answer: `seeds` as listed, else seed, seed+1, ... (`num_samples` of them, 5 unset)."""
    p = cfg.pairs
    if p.seeds is None:
        return [cfg.training.seed + i for i in range(p.num_samples or DEFAULT_SAMPLES)]
    if len(p.seeds) < 2 or len(set(p.seeds)) != len(p.seeds):
        raise PrefoptError(f"seeds: {p.seeds} needs at least two different seeds (one answer is sampled per seed).")
    if p.num_samples is not None and p.num_samples != len(p.seeds):
        raise PrefoptError(f"num_samples is {p.num_samples} but seeds lists {len(p.seeds)}; one answer is sampled "
                           "per seed: drop num_samples, or list that many seeds.")
    return list(p.seeds)


def check_settings(cfg):
    """The pairs keys' own rules, before anything loads."""
    from .schema import ENGINES, SELECTIONS

    p = cfg.pairs
    if cfg.model.model_name_or_path is None:
        raise PrefoptError("prefopt pairs: set model_name_or_path, the policy whose answers become the pairs.")
    if (p.reward_model is None) == (p.reward_function is None):
        raise PrefoptError("prefopt pairs: name one scorer: `reward_model: PATH` (a sequence-classification "
                           "model) or `reward_function: module:function` (a Python function of prompt, answer, row)"
                           + ("; both are set." if p.reward_model is not None else "."))
    if p.selection not in SELECTIONS:
        raise PrefoptError(f"selection: {p.selection!r} is not one of {', '.join(SELECTIONS)}.")
    if p.engine not in ENGINES:
        raise PrefoptError(f"engine: {p.engine!r} is not one of {', '.join(ENGINES)}.")
    seeds_of(cfg)
    output_path(cfg)


def read_prompts(cfg) -> list[PromptRow]:
    """The training sources' prompts, in order (mixed as training mixes them), each checked."""
    from .sources import load_prompts, mix

    sources = cfg.data.train_datasets
    if not sources:
        raise PrefoptError("prefopt pairs: no prompts given: name a dataset with a prompt column (`datasets:`, "
                           "`dataset_mixer:`, `dataset_name:` ...), as for training.")
    loaded = [load_prompts(s, cfg.data.column_mapping) for s in sources]
    parts = mix(sources, [ds for _, ds in loaded])
    rows: list[PromptRow] = []
    for (label, _), ds in zip(loaded, parts):
        for i, row in enumerate(ds):
            where = f"{label} row {i}"
            rows.append(PromptRow(_checked_prompt(row["prompt"], where), row, where))
    if not rows:
        raise PrefoptError(f"{', '.join(label for label, _ in loaded)}: no prompts (the files hold no rows, or "
                           "keep_fraction/fraction left none).")
    return rows[: cfg.pairs.max_prompts] if cfg.pairs.max_prompts else rows


def _checked_prompt(value, where: str):
    if isinstance(value, str):
        if not value.strip():
            raise PrefoptError(f"{where}: the prompt is empty; remove the row or give it a prompt.")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        if value[-1]["role"] == "assistant":
            raise PrefoptError(f"{where}: the prompt's last message is the assistant's; a prompt ends with the turn "
                               "to be answered (drop the assistant message, or keep it in another column).")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PrefoptError(f"{where}: prompt is {type(value).__name__} {str(value)[:60]!r}; a prompt is text or a list of "
                       "chat messages ({role, content}).")


def fingerprint(cfg, prompts: list[PromptRow], engine: str, tokenizer) -> dict:
    """What the answers depend on: a rerun continues only a run with the same."""
    from .templates import rendering

    p, m = cfg.pairs, cfg.model
    texts = hashlib.blake2b(digest_size=16)
    for r in prompts:
        texts.update(json.dumps(r.prompt, ensure_ascii=False).encode() + b"\n")
    style = rendering(tokenizer, cfg.data) if tokenizer.chat_template else None
    return {"policy": _model_identity(m.model_name_or_path), "revision": m.model_revision, "dtype": m.dtype,
            "tokenizer": _model_identity(m.tokenizer_name_or_path) if m.tokenizer_name_or_path else None,
            "chat_template": cfg.data.chat_template, "empty_system_turn": bool(style and style.empty_system),
            "prompts": len(prompts), "prompts_hash": texts.hexdigest(), "seeds": seeds_of(cfg),
            "temperature": p.temperature, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens,
            "generation_batch_size": p.generation_batch_size, "engine": engine,
            "scorer": {"reward_model": p.reward_model and _model_identity(p.reward_model),
                       "reward_function": p.reward_function}}


def _model_identity(name: str) -> str:
    """A local folder's config and weight files (name, size, modification time); a Hub id as written."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return name
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".bin", ".model")):
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"{folder.resolve()} ({h.hexdigest()})"


# -- the run ---------------------------------------------------------------------------------------

def make_pairs(cfg, log=print) -> PairsResult:
    """`prefopt pairs`: see the module's docstring."""
    from . import pairsfiles as files
    from .sampling import choose_engine

    check_settings(cfg)
    output = output_path(cfg)
    policy = policy_tokenizer(cfg)
    prompts = as_format(read_prompts(cfg), prompt_format(cfg, policy[0]))
    engine_name = choose_engine(cfg.pairs.engine)
    settings = fingerprint(cfg, prompts, engine_name, policy[0])
    selection = selection_of(cfg)
    what, report = files.state(output, settings, selection)
    if what == "done":
        if (files.parts_dir(output) / files.SETTINGS_FILE).is_file():  # a run stopped after its pairs were written
            files.open_parts(output, settings, main=False)  # (its own: the same settings)
            files.remove_parts(files.parts_dir(output), -(-len(prompts) // cfg.pairs.generation_batch_size))
        lines = [f"prefopt pairs: {output} is finished with these settings; nothing was done."]
        log(lines[0])
        return PairsResult(output, report, finished_before=True, lines=lines)
    if what == "reselect":
        log(f"prefopt pairs: {output}: the answers are these settings'; making the pairs again for selection "
            f"{selection}")
        return _finish(cfg, output, prompts, files.read_answers(output), None, settings, selection, 0.0, log)
    return _sample(cfg, output, prompts, settings, selection, engine_name, policy, log)


def selection_of(cfg) -> dict:
    """What turns the answers into pairs (a change of it needs no new answers)."""
    p = cfg.pairs
    return {"selection": p.selection, "min_score_gap": p.min_score_gap, "min_chosen_score": p.min_chosen_score,
            "seed": cfg.training.seed}


def _sample(cfg, output, prompts, settings, selection, engine_name, policy, log) -> PairsResult:
    """Every batch not on disk yet, this process's share; then the first process merges them."""
    from accelerate import PartialState

    from . import pairsfiles as files

    state = PartialState()
    if engine_name == "vllm" and state.num_processes > 1:
        raise PrefoptError(f"engine: vllm runs as one process and uses the GPUs itself; started as "
                           f"{state.num_processes} processes. Run `prefopt pairs` without a launcher, or use "
                           "`engine: transformers` to share the prompts between processes.")
    if state.is_main_process:  # made (or checked) by the first process, then checked by the others
        parts = files.open_parts(output, settings, main=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        parts = files.open_parts(output, settings, main=False)
    size = cfg.pairs.generation_batch_size
    batches = (len(prompts) + size - 1) // size
    start = time.time()
    with _stops_cleanly(parts):
        _generate_and_score(cfg, prompts, parts, batches, engine_name, state, policy, log)
        if not state.is_main_process:  # no barrier: a process with fewer batches would wait past its timeout
            return PairsResult(output, {}, lines=[])
        _wait_for_parts(parts, batches)
    records = files.read_parts(parts, batches, len(prompts))
    return _finish(cfg, output, prompts, records, parts, settings, selection, time.time() - start, log,
                   engine=engine_name, batches=batches)


def _wait_for_parts(parts: Path, batches: int):
    """The other processes' batches, on the shared file system (polled: no collective timeout)."""
    from . import pairsfiles as files

    while not all(files.part_file(parts, b).is_file() for b in range(batches)):
        time.sleep(1.0)


def _finish(cfg, output, prompts, records, parts, settings, selection, seconds, log, engine=None,
            batches=0) -> PairsResult:
    from . import pairselect
    from . import pairsfiles as files

    rows, report = pairselect.build(cfg, prompts, records, seeds_of(cfg))
    report.update(settings=settings, selection=selection, seconds=round(seconds, 1))
    if engine is not None:
        report["engine"] = engine
    files.write_result(output, records if parts is not None else None, rows, report)
    if parts is not None:
        files.remove_parts(parts, batches)
    lines = pairselect.format_report(report, output)
    log("\n".join(lines))
    return PairsResult(output, report, lines=lines)


@contextmanager
def _stops_cleanly(parts: Path):
    """SIGTERM or Ctrl-C: stop at once, saying so in one line (exit 128 + the signal); every batch
    written so far is whole and is kept, and the same command continues from them."""
    import signal
    import threading

    from .errors import Stopped
    from .stopping import SIGNALS

    def handle(signum, frame):
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name}; the batches finished so far are kept in "
                              f"{parts}. Run the same command again to continue from them.")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _generate_and_score(cfg, prompts, parts: Path, batches: int, engine_name: str, state, policy, log):
    from .console import clock
    from .pairsfiles import part_file
    from .rewards import ScoreItem, load_scorer
    from .sampling import render_prompt
    from .templates import rendering

    size = cfg.pairs.generation_batch_size
    done = [part_file(parts, b).is_file() for b in range(batches)]
    mine = [b for b in range(state.process_index, batches, state.num_processes) if not done[b]]
    if state.is_main_process:
        log(f"prefopt pairs: {len(prompts)} prompts x {len(seeds_of(cfg))} answers, {batches} batches of {size} "
            f"({sum(done)} done before), engine {engine_name}, {state.num_processes} process(es)")
    if not mine:
        return
    tokenizer = policy[0]
    style = rendering(tokenizer, cfg.data) if tokenizer.chat_template else None  # as training renders the prompts
    engine = _open_engine(cfg, engine_name, state.device, *policy)
    p = cfg.pairs
    scorer = load_scorer(p.reward_model, p.reward_function, trust_remote_code=p.reward_trust_remote_code,
                         batch_size=p.reward_batch_size, device=state.device,
                         search_paths=[str(Path(cfg.source).parent)] if cfg.source and Path(cfg.source).is_file() else [])

    began, last = time.time(), 0.0
    for n, b in enumerate(mine, 1):
        batch = prompts[b * size : (b + 1) * size]
        ids = [render_prompt(tokenizer, r.prompt, r.where, style) for r in batch]
        answers = [engine.sample(ids, seed, b * size) for seed in seeds_of(cfg)]  # [seed][prompt]
        items = [ScoreItem(r.prompt, answers[s][i].text, r.row, r.where)
                 for i, r in enumerate(batch) for s in range(len(answers))]
        scores = scorer.score(items)
        k = len(answers)
        lines = [json.dumps({"index": b * size + i, "answers": [a[i].text for a in answers],
                             "tokens": [a[i].tokens for a in answers], "stopped": [a[i].stopped for a in answers],
                             "scores": scores[i * k : (i + 1) * k]}, ensure_ascii=False) + "\n"
                 for i in range(len(batch))]
        write_atomic(part_file(parts, b), "".join(lines))
        elapsed = time.time() - began
        if state.is_main_process and (n == len(mine) or elapsed - last >= 30 or n == 1):
            last = elapsed
            log(f"pairs: batch {n}/{len(mine)} of this process ({100 * n // len(mine)}%) elapsed {clock(elapsed)} "
                f"eta {clock(elapsed / n * (len(mine) - n))}")


def policy_tokenizer(cfg):
    """The policy's tokenizer with its chat template installed as training installs it, and whether
    that added tokens to the vocabulary."""
    from .models import check_weights_format, load_tokenizer
    from .templates import setup_chat_template

    check_weights_format(cfg.model, "prefopt pairs")
    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, setup_chat_template(tokenizer, cfg.data.chat_template)


def prompt_format(cfg, tokenizer) -> str:
    """chat or text: `prompt_format`, or under auto chat where the policy has a chat template."""
    asked = cfg.pairs.prompt_format
    if asked not in ("auto", "chat", "text"):
        raise PrefoptError(f"prompt_format: {asked!r} is not one of auto, chat, text.")
    if asked == "chat" and not tokenizer.chat_template:
        raise PrefoptError("prompt_format: chat, but the policy's tokenizer has no chat template; set "
                           "`chat_template: chatml` (or a .jinja file), or prompt_format: text.")
    if asked == "auto":
        return "chat" if tokenizer.chat_template else "text"
    return asked


def as_format(prompts: list[PromptRow], fmt: str) -> list[PromptRow]:
    """Text prompts as one user turn where the policy answers in chat (its pairs are then chat rows, which
    training renders with the same template); a chat prompt without a template to render it is refused."""
    for p in prompts:
        if fmt == "chat" and isinstance(p.prompt, str):
            p.prompt = [{"role": "user", "content": p.prompt}]
        elif fmt == "text" and not isinstance(p.prompt, str):
            raise PrefoptError(f"{p.where}: the prompt is chat messages, but prompt_format is text (or the policy's "
                               "tokenizer has no chat template); set `chat_template: chatml`, or give text prompts.")
    return prompts


def _open_engine(cfg, engine_name: str, device, tokenizer, grew: bool):
    """The engine that samples the policy's answers."""
    import torch

    from .sampling import TransformersEngine, VllmEngine, stop_ids

    m = cfg.model
    dtype = {None: torch.float32, "auto": "auto"}.get(m.dtype, getattr(torch, m.dtype or "float32", torch.float32))
    if engine_name == "vllm":
        if grew:
            raise PrefoptError("engine: vllm cannot add the chat template's new tokens to the policy's vocabulary; "
                               "use a model that has them, or `engine: transformers`.")
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(m.model_name_or_path, revision=m.model_revision)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation = None
        return VllmEngine(m.model_name_or_path, tokenizer, cfg.pairs, stop_ids(generation, tokenizer),
                          m.trust_remote_code, m.dtype)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(m.model_name_or_path, revision=m.model_revision, dtype=dtype,
                                                     trust_remote_code=m.trust_remote_code,
                                                     use_safetensors=None if m.allow_pickle_weights else True)
    except OSError as e:
        raise PrefoptError(f"could not load the policy from {m.model_name_or_path!r}: {str(e).splitlines()[0]}") from None
    if grew:
        model.resize_token_embeddings(len(tokenizer))
    return TransformersEngine(model.to(device), tokenizer, cfg.pairs)
