"""Normalised rows → token ids per pair: rendered, tokenized, ended with EOS, truncated, kept or dropped.

    kept, marks = tokenize(ds, tokenizer, cfg.data)

Rows keep TRL 1.16's conventions (`CPOTrainer.tokenize_row`, kept on purpose), so the same
inputs give the same token ids: conversations are rendered with the generation prompt
(`templates.render`, layout trl), so the assistant header is part of the prompt; prompt and
prompt+completion are tokenized together; BOS once at the start, EOS after each completion unless
already there; an over-long pair loses completion tokens. Beyond TRL: optional prompt/completion
caps; a completion never ends in a second EOS or whitespace after its first (`_end_at_eos` lists
every template family where that differs from TRL); and pairs that would teach nothing are
dropped and counted rather than trained on: a blank completion, one cut to nothing, chosen equal
to rejected, a pair seen before in the split.

`completion_layout: simpo_repo` renders chat rows as the SimPO repository's run_simpo.py does
(`templates.LAYOUTS`), and its completions are what the template rendered, then EOS unless last,
without the clean-up; the tokenization after the rendering (BOS, EOS, the boundary where a
tokenizer merges across it) is the same rule, which is the repository's too (`tokenize_row`,
`build_tokenized_answer`). Truncation stays prefopt's in both layouts: the repository's keeps the
prompt's end without its BOS and cuts every completion to max_length - max_prompt_length, whatever
the prompt's length; prefopt keeps BOS (keep_end) and cuts only what max_length needs. Where a
tokenizer merges the prompt's last token with one answer's first but not the other's, prefopt's
prompt is the shorter one both share, the repository keeps each answer's own.

In: normalised rows (`rows.normalise`): `prompt`, `chosen`, `rejected` (all text or all chat),
`source`, `row`.
Out: `kept`, a Dataset of the pairs kept: `source` (str), `row` (int), `prompt_ids`,
`chosen_ids`, `rejected_ids` (list[int]; the model sees prompt_ids + chosen_ids and prompt_ids +
rejected_ids, the loss covers the completion part) and `length` (int: prompt + chosen + rejected
tokens, the cost the length-based samplers balance); and `marks`, a pyarrow Table of every row
with those columns and `drop` (str: "" for a kept pair, else its reason from `DROP_REASONS`),
`key` (str, a hash of the pair's text) and `prompt_truncated`, `chosen_truncated`,
`rejected_truncated` (bool: that part lost tokens), which `report` reads.
"""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.fingerprint import Hasher

from .config import DataArgs
from .errors import PrefoptError
from .fingerprint import fingerprint
from .rows import PAIR, at, column_kind, common_prefix_len
from .templates import Rendering, completion_layout, render, rendering

# Why a pair is dropped, in order of precedence, and what to change.
DROP_FIXES = {
    "empty_completion": "fill in or remove the blank answers",
    "truncated_to_nothing": "raise max_length, or set max_prompt_length so that long prompts are cut instead",
    "chosen_equals_rejected": "remove pairs whose answers are the same (raise max_completion_length or max_length "
                              "if they differ only after the cut)",
    "duplicate_pair": "remove the repeated pairs",
}
DROP_REASONS = tuple(DROP_FIXES)
TRUNCATION_FLAGS = tuple(f"{name}_truncated" for name in PAIR)


def tokenize(ds: Dataset, tokenizer, data: DataArgs) -> tuple[Dataset, pa.Table]:
    """Normalised rows → (the kept pairs, `marks`: every row with its drop reason and truncation flags)."""
    conversational = column_kind(ds.features["chosen"]) == "chat"
    if conversational and tokenizer.chat_template is None:
        raise PrefoptError(f"{at(ds, 0)}: the pairs are chat messages but the tokenizer has no chat template; set "
                           "`chat_template: chatml` (or a .jinja file).")
    if tokenizer.eos_token_id is None:
        raise PrefoptError("the tokenizer has no eos token, so completions could not be ended; use a tokenizer "
                           "with one, or `chat_template: chatml` (which makes <|im_end|> the eos token).")
    # the layout is read (and refused if unknown) for text rows too: a config's mistake is not hidden by its data
    style = rendering(tokenizer, data) if conversational else Rendering(layout=completion_layout(data))
    options = dict(conversational=conversational, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                   max_completion_length=data.max_completion_length, keep_end=data.truncation_mode == "keep_end",
                   style=style, eos_cleanup=data.eos_cleanup)
    out = ds.map(
        _tokenize_batch,
        batched=True,
        num_proc=data.preprocessing_num_workers,
        remove_columns=ds.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, **options),
        desc="Tokenizing pairs",
        # both keys as given, besides the rendering they resolve to
        new_fingerprint=fingerprint(ds, "tokenize", Hasher.hash(tokenizer), options, data.completion_layout,
                                    data.auto_insert_empty_system_msg),
    )
    table = out.with_format("arrow")[:]
    drops = _mark_duplicates(table["drop"].to_pylist(), table["key"].to_pylist())
    table = table.set_column(table.column_names.index("drop"), "drop", pa.array(drops, pa.string()))
    kept = np.flatnonzero(pc.equal(table["drop"], "").to_numpy(zero_copy_only=False))
    return out.select(kept).remove_columns(["drop", "key", *TRUNCATION_FLAGS]), table


def _mark_duplicates(drops: list[str], keys: list[str]) -> list[str]:
    """`drops` with every kept pair that repeats an earlier kept pair of the split marked."""
    seen = set()
    for i, key in enumerate(keys):
        if not drops[i]:
            drops[i] = "duplicate_pair" if key in seen else ""
            seen.add(key)
    return drops


def _tokenize_batch(batch: dict, tokenizer, conversational: bool, max_length: int | None,
                    max_prompt_length: int | None, max_completion_length: int | None, keep_end: bool,
                    style: Rendering, eos_cleanup: bool = True) -> dict:
    triples = list(zip(batch["prompt"], batch["chosen"], batch["rejected"]))
    blank = [_blank(c, conversational) or _blank(r, conversational) for _, c, r in triples]
    if conversational:
        # a blank pair is dropped below; an empty conversation could not be rendered
        triples = [("", "", "") if b else render(tokenizer, *t, f"{s} row {i}", style)
                   for t, b, s, i in zip(triples, blank, batch["source"], batch["row"])]
    # the SimPO repository trains what its template renders, and so does TRL (eos_cleanup: false, the drop-in)
    if eos_cleanup and (style.layout == "trl" or not conversational):
        eos = tokenizer.eos_token
        triples = [(p, _end_at_eos(c, eos), _end_at_eos(r, eos)) for p, c, r in triples]
    prompts, chosens, rejecteds = (list(x) for x in zip(*triples))
    prompt_ids = _encode(tokenizer, prompts)
    chosen_full = _encode(tokenizer, [p + c for p, c in zip(prompts, chosens)])
    rejected_full = _encode(tokenizer, [p + r for p, r in zip(prompts, rejecteds)])

    out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "drop", *TRUNCATION_FLAGS)}
    # what makes two pairs the same, whatever the truncation: their text
    out["key"] = [hashlib.blake2b(json.dumps(t).encode(), digest_size=16).hexdigest() for t in triples]
    for i in range(len(triples)):
        prompt, chosen, rejected = _split_ids(prompt_ids[i], chosen_full[i], rejected_full[i],
                                              tokenizer.bos_token_id, tokenizer.eos_token_id)
        cut_prompt = _truncate_prompt(prompt, max_prompt_length, keep_end, tokenizer.bos_token_id)
        cut_chosen = _truncate_completion(chosen, len(cut_prompt), max_completion_length, max_length)
        cut_rejected = _truncate_completion(rejected, len(cut_prompt), max_completion_length, max_length)
        out["prompt_ids"].append(cut_prompt)
        out["chosen_ids"].append(cut_chosen)
        out["rejected_ids"].append(cut_rejected)
        out["prompt_truncated"].append(len(cut_prompt) < len(prompt))
        out["chosen_truncated"].append(len(cut_chosen) < len(chosen))
        out["rejected_truncated"].append(len(cut_rejected) < len(rejected))
        out["drop"].append("empty_completion" if blank[i]
                           else "truncated_to_nothing" if not (cut_chosen and cut_rejected)
                           else "chosen_equals_rejected" if cut_chosen == cut_rejected else "")
    # unique tokens of the pair (prompt once): the cost the "length"-based samplers balance
    out["length"] = [len(p) + len(c) + len(r) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])]
    return {**out, "source": batch["source"], "row": batch["row"]}


def _blank(answer, conversational: bool) -> bool:
    """An answer with nothing to learn from: empty or whitespace-only text."""
    if conversational:
        return all(not m["content"].strip() for m in answer)
    return not answer.strip()


def _end_at_eos(completion: str, eos: str) -> str:
    """`completion` ending at its first EOS when only whitespace and EOS follow it (layout trl, and
    text rows).

    Nothing after the first EOS is ever generated, so it is cut rather than trained on. TRL keeps
    the completion's text whole and appends EOS unless the last token is EOS already, so the two
    differ exactly where a completion's text has whitespace or a second EOS after an EOS. Per
    template family, the end of a chat completion (tests/test_eos_cleanup.py checks each line):

        family, EOS                           TRL trains                      prefopt trains
        Llama 3 Instruct, <|eot_id|>          <|eot_id|>                      the same
        Llama 3 template, <|end_of_text|>     <|eot_id|> <|end_of_text|>      the same (the turn end is not EOS)
        Mistral [INST] ... [/INST], </s>      </s>                            the same
        Zephyr (<|assistant|>\n ...), </s>    </s> \n </s>                    </s>
        ChatML / Qwen chat, <|im_end|>        <|im_end|> \n <|im_end|>        <|im_end|>
        ChatML / Qwen base, <|endoftext|>     <|im_end|> \n <|endoftext|>     the same (the turn end is not EOS)
        Phi-3, <|endoftext|>                  <|end|> \n <|endoftext|>        the same (the template's own EOS ends it)
        Phi-3, <|end|> as EOS                 <|end|> \n <|end|>              <|end|>
        Gemma, <eos>                          <end_of_turn> \n <eos>          the same (the turn end is not EOS)
        Gemma, <end_of_turn> as EOS           <end_of_turn> \n <end_of_turn>  <end_of_turn>

    (`\n` is the newline's token: `▁\n` in SentencePiece vocabularies, `Ċ` in byte-level ones.)
    Text rows: `... </s>` followed by whitespace, or `... </s></s>`, end at the first `</s>`, where
    TRL trains the whitespace and another EOS, or both EOS. The simpo_repo layout skips the
    clean-up, as the SimPO repository does (its completion is what the template renders, then EOS
    unless last).
    """
    end = completion.rstrip()
    if not end.endswith(eos):
        return completion
    while end[:-len(eos)].rstrip().endswith(eos):
        end = end[:-len(eos)].rstrip()
    return end


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # No special tokens from the tokenizer: BOS and EOS placement is decided in `_split_ids`.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _split_ids(prompt: list[int], chosen_full: list[int], rejected_full: list[int],
               bos: int | None, eos: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of prompt alone and of prompt+answer → (prompt, chosen, rejected) ids, with BOS/EOS.

    The answer starts where the full ids stop matching the prompt's: a tokenizer may merge the
    prompt's last characters with the answer's first (TRL assumes at most one token differs).
    The prompt is what both answers' prefixes share, so prompt+chosen is exactly the tokenized
    prompt+chosen text, and likewise for rejected.
    """
    shared = min(common_prefix_len(prompt, chosen_full), common_prefix_len(prompt, rejected_full))
    prompt_ids, chosen_ids, rejected_ids = chosen_full[:shared], chosen_full[shared:], rejected_full[shared:]
    if bos is not None and prompt_ids[:1] != [bos]:  # a template may render BOS itself: never twice
        prompt_ids = [bos] + prompt_ids
    if chosen_ids[-1:] != [eos]:
        chosen_ids = chosen_ids + [eos]
    if rejected_ids[-1:] != [eos]:
        rejected_ids = rejected_ids + [eos]
    return prompt_ids, chosen_ids, rejected_ids


def _truncate_prompt(ids: list[int], limit: int | None, keep_end: bool, bos: int | None) -> list[int]:
    """At most `limit` tokens: the first ones (keep_start), or BOS then the last ones (keep_end)."""
    if limit is None or len(ids) <= limit:
        return ids
    if not keep_end:
        return ids[:limit]
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (limit - len(head)):]


def _truncate_completion(ids: list[int], prompt_len: int, limit: int | None, max_length: int | None) -> list[int]:
    """Cap at `limit`, then cut what prompt + completion has beyond `max_length` (TRL 1.16's rule)."""
    if limit is not None:
        ids = ids[:limit]
    if max_length is not None and prompt_len + len(ids) > max_length:
        ids = ids[:max(0, max_length - prompt_len)]
    return ids
