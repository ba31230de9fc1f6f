"""Offline demo: teach a tiny model, from preference pairs, to sort digits.

    make_rows(1, seed=0)
    # [{"prompt": "Sort: 6 0 4 8 7 6 =", "chosen": " 0 4 6 6 7 8", "rejected": " 0 4 6 6 7 8 4"}]
    is_correct("Sort: 3 1 2 =", " 1 2 3")  # True
"""

from __future__ import annotations

import random
import re

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
