"""Offline demo: teach a tiny model, from preference pairs, to sort digits.

    prefopt train          # (or `make demo`) runs `run_demo()`: everything below, offline

    make_rows(1, seed=0)
    # [{"prompt": "Sort: 6 0 4 8 7 6 =", "chosen": " 0 4 6 6 7 8", "rejected": " 0 4 6 6 7 8 4"}]
    is_correct("Sort: 3 1 2 =", " 1 2 3")  # True
    sort_reward("Sort: 3 1 2", "1 2 2")     # -0.333: the scorer for `prefopt pairs` (on-policy rounds)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Synthetic task: sort a list of digits.
#
# Why sorting: a 2-layer, hidden-64 llama trained with a CPO-style loss (NLL on chosen plus a
# preference term), lr 3e-3, 32 pairs a step, goes from 0% to ~95% exact greedy answers in ~3000
# steps, under 1.5 minutes on 2 idle CPU cores; reversing the list learned markedly slower.
# Rejected answers are near misses (an adjacent pair swapped, a digit changed, dropped or added),
# so they share most tokens with the chosen answer, and ~70% are exactly as long (chosen is longer
# in ~15%, shorter in ~15%): length alone does not give the answer away.
# ---------------------------------------------------------------------------------------------

MIN_DIGITS, MAX_DIGITS = 3, 6
_PROMPT = re.compile(r"Sort:((?: \d)+)")


def _instruction(digits: list[int]) -> str:
    return "Sort: " + " ".join(map(str, digits))


def _near_miss(rng: random.Random, answer: list[int]) -> list[int]:
    """`answer` broken in one place: ~40% adjacent swap, ~30% digit changed, ~15% dropped, ~15% added."""
    wrong = list(answer)
    kind = rng.random()
    swappable = [i for i in range(len(wrong) - 1) if wrong[i] != wrong[i + 1]]
    if kind < 0.4 and swappable:
        i = rng.choice(swappable)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    elif kind < 0.7:  # also taken when a swap was drawn but none is possible
        i = rng.randrange(len(wrong))
        wrong[i] = rng.choice([d for d in range(10) if d != wrong[i]])
    elif kind < 0.85:
        del wrong[rng.randrange(len(wrong))]
    else:
        wrong.insert(rng.randrange(len(wrong) + 1), rng.randrange(10))
    return wrong


def _examples(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        answer = sorted(digits)
        yield digits, answer, _near_miss(rng, answer)


def _words(digits: list[int]) -> str:
    return " ".join(map(str, digits))


def make_rows(n: int, seed: int, chat: bool = False) -> list[dict]:
    """`n` preference rows, the same for a given seed.

    Plain rows are meant to be concatenated: the prompt ends in " =" and the answers start with a
    space ({"prompt": "Sort: 6 0 4 =", "chosen": " 0 4 6", ...}). With `chat=True` the same
    examples come as message lists: a user turn "Sort: 6 0 4" and assistant turns "0 4 6".
    """
    rows = []
    for digits, answer, wrong in _examples(n, seed):
        if chat:
            rows.append({
                "prompt": [{"role": "user", "content": _instruction(digits)}],
                "chosen": [{"role": "assistant", "content": _words(answer)}],
                "rejected": [{"role": "assistant", "content": _words(wrong)}],
            })
        else:
            rows.append({
                "prompt": _instruction(digits) + " =",
                "chosen": " " + _words(answer),
                "rejected": " " + _words(wrong),
            })
    return rows


def task_corpus(n: int = 500, seed: int = 12345) -> list[str]:
    """Texts to train the demo tokenizer on: the plain and the chat form of `n` examples."""
    texts = []
    for digits, answer, _ in _examples(n, seed):
        texts.append(f"{_instruction(digits)} = {_words(answer)}")
        texts.append(f"user\n{_instruction(digits)}\nassistant\n{_words(answer)}\n")
    return texts


def is_correct(prompt: str, response: str) -> bool:
    """Whether `response` is the prompt's digits in ascending order (surrounding whitespace ignored).

    `prompt` is a plain prompt or the user message of a chat row; `response` is the decoded
    generation without special tokens.
    """
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"Not a sort prompt (expected 'Sort: <digits separated by spaces>'): {prompt!r}")
    return response.split() == sorted(match.group(1).split())


def _edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two token lists (one row of the table at a time)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def sort_reward(prompt, answer: str, row: dict | None = None) -> float:
    """The demo task's programmatic scorer, for `prefopt pairs` (`reward_function: prefopt.demo:sort_reward`).

    1.0 for a correct sort; a wrong answer scores minus its token edit distance to the sorted
    digits, divided by their count (so in (-inf, 0): a near miss ~-0.2, a runaway repeat far
    lower). With `min_chosen_score: 1` the chosen answer is always correct and the rejected one is
    the model's own worst wrong answer; the graded negatives break the ties a pass/fail scorer leaves
    among wrong answers. `prompt` is the text or the chat messages (the last user turn is read).
    """
    if not isinstance(prompt, str):
        prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
    if is_correct(prompt, answer):
        return 1.0
    want = sorted(_PROMPT.search(prompt).group(1).split())
    return -_edit_distance(answer.split(), want) / len(want)


# ---------------------------------------------------------------------------------------------
# The demo run: build a tiny model and tokenizer, write the task as jsonl, train with the normal
# pipeline (so the demo exercises the real local-folder and local-file paths), and show what
# changed: held-out preference accuracy and greedy answers, before and after.
# ---------------------------------------------------------------------------------------------

DEMO_CONFIG = {
    "method": "cpo_simpo",  # SimPO's preference term plus an NLL term: it also learns to answer
    "beta": 2.0,
    "gamma_beta_ratio": 0.5,
    "nll_weight": 1.0,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    # Longer is not better here: at 3000 steps greedy answers got worse (77% -> 48% correct) while
    # preference accuracy stayed 1.0 — the preference term learns "repeated digits are bad" from
    # near misses that insert a digit, and starts dropping duplicates. Over-optimisation in miniature.
    "max_steps": 1200,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "logging_steps": 50,
    "eval_strategy": "steps",
    "eval_steps": 400,
    "eval_on_start": True,  # the "before" numbers
    "save_strategy": "no",
    "max_length": 64,
    "seed": 0,
}


def _held_out(n: int, train_prompts: set[str], seed: int) -> list[dict]:
    """Chat rows whose prompts never occur in training."""
    rows = [r for r in make_rows(4 * n, seed, chat=True) if r["prompt"][0]["content"] not in train_prompts]
    return rows[:n]


def _generate(model_dir: Path, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    from .sampling import render_prompt

    with torch.no_grad():
        for prompt in prompts:  # the prompt as training renders it: the chat template, BOS first
            ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": prompt}], "demo")])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def run_demo(output_dir: str | Path = "demo_output", log=print, **overrides) -> dict:
    """Train the demo end to end; returns the measured before/after numbers.

    `overrides` replace DEMO_CONFIG entries (the tests shorten the run with them).
    """
    from . import console

    console.quiet_deepspeed(False, console.device_type())
    with console.library_bars(console.is_terminal(), weights=0):  # a 0.1M-parameter model: no loading bars
        return _run_demo(output_dir, log, **overrides)


def write_task(out: Path, log=print) -> tuple[dict, Path, list[dict]]:
    """The demo's base model (out/base_model) and data (out/data/{train,test}.jsonl): the config keys
    naming them, the model's folder and the held-out rows. With DEMO_CONFIG and an output_dir, the
    keys make a full config (what the tests of `prefopt sweep` train on)."""
    from .tiny import save_tiny, tiny_model, train_tokenizer

    data_dir = out / "data"
    data_dir.mkdir(parents=True)
    train_rows = make_rows(6000, seed=1, chat=True)
    test_rows = _held_out(256, {r["prompt"][0]["content"] for r in train_rows}, seed=2)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer = train_tokenizer(task_corpus(), vocab_size=300)
    model = tiny_model("llama", tokenizer, seed=0)
    base = save_tiny(model, tokenizer, out / "base_model")
    log(f"prefopt demo: a {model.num_parameters() / 1e6:.2f}M-parameter "
        f"llama and a {len(tokenizer)}-token tokenizer built in {base}; {len(train_rows)} training pairs, "
        f"{len(test_rows)} held-out pairs with unseen prompts")
    keys = {"model_name_or_path": str(base), "dataset_mixer": {str(data_dir): 1.0}, "dataset_splits": ["train", "test"]}
    return keys, base, test_rows


def _run_demo(output_dir, log, **overrides) -> dict:
    from .config import build_config
    from .pipeline import train

    start = time.time()
    out = Path(output_dir)
    _clear_previous_demo(out)
    out.mkdir(parents=True)
    (out / DEMO_MARK).write_text("written by `prefopt train` (the offline demo); a rerun replaces this folder\n")
    keys, base, test_rows = write_task(out, log)
    cfg = build_config({**DEMO_CONFIG, **overrides, **keys, "output_dir": str(out / "model")}, where="demo")
    probe = [r["prompt"][0]["content"] for r in test_rows[:64]]
    before = _generate(base, probe)
    result = train(cfg, log=log)
    after = _generate(Path(cfg.training.output_dir), probe)

    evals = [json.loads(line) for line in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_rewards/accuracies" in e]
    acc_before, acc_after = evals[0]["eval_rewards/accuracies"], evals[-1]["eval_rewards/accuracies"]
    right = lambda answers: sum(is_correct(p, a) for p, a in zip(probe, answers)) / len(probe)  # noqa: E731
    numbers = {
        "preference_accuracy_before": acc_before,
        "preference_accuracy_after": acc_after,
        "greedy_correct_before": right(before),
        "greedy_correct_after": right(after),
        "seconds": time.time() - start,
    }
    lines = [
        "",
        "prefopt demo: held-out results",
        f"  preference accuracy (chosen reward > rejected), {len(test_rows)} unseen pairs: "
        f"{acc_before:.3f} before -> {acc_after:.3f} after",
        f"  greedy answers that are correctly sorted, {len(probe)} unseen prompts: "
        f"{numbers['greedy_correct_before']:.0%} before -> {numbers['greedy_correct_after']:.0%} after",
        "  examples (prompt | before | after):",
        *[f"    {p:<20} | {b[:24]:<24} | {a}" for p, b, a in zip(probe[:5], before, after)],
        f"  total time {numbers['seconds']:.0f}s; eval metrics per step in {result.output_dir / 'metrics.jsonl'}",
        *_next_steps(out),
    ]
    log("\n".join(lines))
    return numbers


DEMO_MARK = ".prefopt_demo"


def _clear_previous_demo(out: Path):
    """A rerun starts afresh, but only over a folder an earlier demo wrote (it holds DEMO_MARK): a
    folder of the user's that happens to bear the name is never deleted."""
    from .errors import PrefoptError

    if not out.exists():
        return
    if not (out / DEMO_MARK).is_file():
        raise PrefoptError(f"the demo writes into {out}/, which exists and was not written by the demo (no "
                           f"{DEMO_MARK} in it); nothing was changed. Move or rename it, or run the demo elsewhere "
                           f"(`cd` to another folder first).")
    shutil.rmtree(out)


def _command() -> str:
    """How this shell reaches prefopt: `prefopt` when it is on PATH, else the virtualenv's script."""
    import os
    import sys

    if shutil.which("prefopt"):
        return "prefopt"
    script = Path(sys.executable).parent / "prefopt"
    if script.exists():
        try:
            return os.path.relpath(script)
        except ValueError:  # another drive (Windows)
            return str(script)
    return f"{Path(sys.executable).name} -m prefopt"


def _next_steps(out: Path) -> list[str]:
    import os
    import sys

    run = _command()
    model = out / "model"
    activate = Path(sys.executable).parent / "activate"
    how = ("" if run == "prefopt" or not activate.exists() else
           f" (or `source {os.path.relpath(activate)}` once per shell, then plain `prefopt`)")
    return [
        "",
        f"next, with {run}{how}:",
        f"  {run} generate --model {model}  # chat with the trained model",
        f"  {run} eval --model {out / 'base_model'} --model {model} --data {out / 'data' / 'test.jsonl'}",
        f"  {run} plot {model}  # PNGs in {model / 'plots'}",
        f"  {run} --help",
    ]
