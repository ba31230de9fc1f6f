"""`prefopt data`: the data pipeline alone, and a look at what the trainer will get from it.

    path = data_preview(cfg, examples=3)          # prints the report and examples; writes data_preview.txt

The tokenizer loads and `data.prepare` runs exactly as `train` runs them (the chat template
installed, both splits read, tokenized, checked and reported); no model weights load. The
report is `data.format_report`'s, the lines `train` prints. Then the first `examples` pairs of
the train split, each sequence decoded from the ids the collator puts in a batch, with the
positions it marks for scoring: the completion tokens whose log-probs enter the loss are told
apart from the prompt (green on a terminal, between ⟦ ⟧ elsewhere), special tokens are marked
«…» (and bold on a terminal), and each sequence's BOS and EOS are counted (a second BOS or a
missing final EOS flagged).

The padded collator is used for this: it is the reference layout, and every layout scores the
same tokens (collate.py's one batch contract; the tests compare the packed one), so the preview
needs no model config to choose a layout.

What is written: `data_preview.txt` in output_dir (or `--output FILE`), the plain text after one
marker line holding its hash. A file of that name is replaced only when it is prefopt's and
unedited (the marker's hash matches); any other is the user's and refused, never overwritten.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .collate import collator_for
from .config import Config
from .errors import PrefoptError

PREVIEW_FILE = "data_preview.txt"
MARKER = "# prefopt data preview, written by `prefopt data` (which replaces it unless edited); xxh3 "
OPEN, CLOSE = "⟦", "⟧"  # the scored part, in plain text
SPECIAL_OPEN, SPECIAL_CLOSE = "«", "»"
GREEN, MAGENTA, BOLD, RESET = "\033[32m", "\033[35m", "\033[1m", "\033[0m"


@dataclass
class Piece:
    """A run of tokens decoded together: all scored or all not, one special token or none."""

    text: str
    scored: bool
    special: bool


def data_preview(cfg: Config, examples: int = 3, output: str | None = None, colour: bool | None = None,
                 stream=None) -> Path:
    """Prepare the data as `train` does, print the report and `examples` decoded pairs to `stream`
    (stdout; coloured when it is a terminal, unless `colour` says otherwise or NO_COLOR is set), and
    write the same, plain, to `output` (default output_dir/data_preview.txt). Returns that path."""
    import os

    from transformers import set_seed

    from . import data as data_mod
    from .models import load_tokenizer

    stream = stream or sys.stdout
    if colour is None:
        colour = stream.isatty() and not os.environ.get("NO_COLOR")
    path = Path(output) if output else Path(cfg.training.output_dir) / PREVIEW_FILE
    check_target(path, "--output" if output else "output_dir")
    set_seed(cfg.training.seed)  # as train does before preparing
    tokenizer = load_tokenizer(cfg.model)
    prepared = data_mod.prepare(cfg, tokenizer)
    head = [f"prefopt data: {cfg.source or 'config'} (tokenizer {tokenizer.name_or_path}; no model weights loaded)",
            data_mod.format_report(prepared.report)]
    plain = "\n".join(head + [examples_text(cfg, tokenizer, prepared.train, examples, colour=False)]) + "\n"
    shown = plain if not colour else "\n".join(
        head + [examples_text(cfg, tokenizer, prepared.train, examples, colour=True)]) + "\n"
    write_preview(path, plain)
    print(shown, end="", file=stream)
    print(f"prefopt: data preview written to {path}", file=stream)
    return path


def check_target(path: Path, named: str):
    """Refuse a place the preview may not be written: a folder, a link, or a file that is not an
    unedited preview of prefopt's. `named` says where the path came from, for the message."""
    if path.parent.exists() and not path.parent.is_dir():
        raise PrefoptError(f"{named}: {path.parent} is a file, not a folder: choose another {named}.")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        other = "--output FILE" if named == "--output" else "output_dir (or --output FILE)"
        raise PrefoptError(f"{named}: {path} is not a plain file; prefopt will not write through it. Move it, or "
                           f"choose another {other}.")
    if path.is_file() and not is_own_preview(path):
        raise PrefoptError(f"{named}: {path} exists and is not a preview prefopt wrote (or it was edited since), so "
                           "it is not overwritten. Move it, or write the preview elsewhere with --output FILE.")


def is_own_preview(path: Path) -> bool:
    """Whether `path` is a preview as `write_preview` wrote it: the marker line, then the text it hashes."""
    try:
        first, _, rest = path.read_text(encoding="utf-8").partition("\n")
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(MARKER) and first[len(MARKER):] == xxhash.xxh3_64_hexdigest(rest.encode())


def write_preview(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{MARKER}{xxhash.xxh3_64_hexdigest(text.encode())}\n{text}", encoding="utf-8")


def examples_text(cfg: Config, tokenizer, train, n: int, colour: bool) -> str:
    """The legend and the first `n` train pairs, each as the model sees its two sequences."""
    n = min(n, len(train))
    if n == 0:
        return "examples: none asked for (--examples N shows the first N train pairs)"
    collator = collator_for(cfg, tokenizer.pad_token_id, "padded")
    lines = [f"examples: train pairs 0 to {n - 1} of {len(train)}, in the split's order (the trainer's sampler "
             "shuffles them); the token ids are the collator's, decoded",
             legend(colour)]
    if collator.score_prompt:
        lines.append(f"note: {cfg.objective.method}'s NLL term also scores the chosen prompt's tokens (after the "
                     "first); marked is what the preference loss scores")
    for i in range(n):
        lines += pair_lines(i, train[i], collator, tokenizer, colour)
    return "\n".join(lines)


def legend(colour: bool) -> str:
    if colour:
        return (f"legend: {GREEN}green{RESET}: the scored part (completion tokens whose log-probs enter the loss); "
                f"uncoloured: the prompt, seen but not scored; {BOLD}{MAGENTA}{SPECIAL_OPEN}…{SPECIAL_CLOSE}{RESET}: "
                f"a special token (BOS, EOS, pad, the chat template's), bold, {GREEN}green{RESET} where it is scored")
    return (f"legend: {OPEN}…{CLOSE}: the scored part (completion tokens whose log-probs enter the loss); outside "
            f"it the prompt, seen but not scored; {SPECIAL_OPEN}…{SPECIAL_CLOSE}: a special token (BOS, EOS, pad, "
            "the chat template's)")


def pair_lines(i: int, pair: dict, collator, tokenizer, colour: bool) -> list[str]:
    """One pair: where it came from, its lengths, then its chosen and rejected sequences."""
    batch = collator([pair])
    P = len(pair["prompt_ids"])
    lines = ["", f"=== train pair {i}: {pair['source']} row {pair['row']} — prompt {P} tokens, chosen "
             f"{len(pair['chosen_ids'])}, rejected {len(pair['rejected_ids'])}"]
    for r, name in enumerate(("chosen", "rejected")):
        ids, scored = scored_positions(batch, r)
        lines.append(f"--- {name} (prompt + {name}: {len(ids)} tokens; {bos_eos(ids, tokenizer)})")
        lines.append(render(pieces(ids, scored, tokenizer), colour))
    return lines


def scored_positions(batch: dict, r: int) -> tuple[list[int], set[int]]:
    """Row `r` of a padded batch (its real tokens) and the positions in it whose token the loss
    scores as completion, read from the collator's score_index (position t - 1 predicts token t)."""
    T = batch["input_ids"].shape[1]
    L = int(batch["attention_mask"][r].sum())
    ids = batch["input_ids"][r, :L].tolist()
    scored = set()
    for index, target, completion in zip(batch["score_index"].tolist(), batch["score_target"].tolist(),
                                         batch["score_is_completion"].tolist()):
        if index // T == r and completion:
            t = index % T + 1
            assert ids[t] == target, "the collator's target is not the row's next token"
            scored.add(t)
    return ids, scored


def pieces(ids: list[int], scored: set[int], tokenizer) -> list[Piece]:
    """`ids` cut where scoring changes and around each special token, each run decoded whole (so
    a character spread over several tokens decodes as it does for the model's tokenizer)."""
    special = set(tokenizer.all_special_ids)
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        boundary = t == len(ids) or ids[t] in special or ids[t - 1] in special or ((t in scored) != (t - 1 in scored))
        if boundary:
            run = ids[start:t]
            out.append(Piece(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                             scored=start in scored, special=run[0] in special))
            start = t
    return out


def render(parts: list[Piece], colour: bool) -> str:
    """The pieces as text: the scored part green (colour) or between ⟦ ⟧; special tokens in « »."""
    text, inside = [], False
    for p in parts:
        shown = f"{SPECIAL_OPEN}{p.text}{SPECIAL_CLOSE}" if p.special else p.text
        if colour:
            code = (BOLD if p.special else "") + (GREEN if p.scored else MAGENTA if p.special else "")
            text.append(f"{code}{shown}{RESET}" if code else shown)
            continue
        if p.scored != inside:
            text.append(OPEN if p.scored else CLOSE)
            inside = p.scored
        text.append(shown)
    if inside:
        text.append(CLOSE)
    return "".join(text)


def bos_eos(ids: list[int], tokenizer) -> str:
    """BOS and EOS counts of one sequence, with what looks wrong said: BOS twice, BOS not first,
    no BOS where the tokenizer adds one to text, no EOS at the end, EOS twice at the end."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    flags = []
    if bos is None:
        counts = "BOS: the tokenizer has none"
    else:
        n = ids.count(bos)
        counts = f"BOS {n}"
        if n > 1:
            flags.append(f"BOS {n} times (a double BOS: the template and the tokenizer both add one?)")
        elif n == 1 and ids[0] != bos:
            flags.append("BOS not first")
        elif n == 0 and tokenizer("x").input_ids[:1] == [bos]:
            flags.append("no BOS, though the tokenizer starts text with one")
    counts += f", EOS {ids.count(eos)}"
    if not ids or ids[-1] != eos:
        flags.append("no EOS at the end")
    elif len(ids) > 1 and ids[-2] == eos:
        flags.append("EOS twice at the end")
    return counts + "".join(f"; check: {f}" for f in flags)
