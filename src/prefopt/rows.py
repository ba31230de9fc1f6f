"""The row schema: what a preference row may hold, checked, and normalised to prompt/chosen/rejected.

    ds = normalise(ds)                 # one source's rows → explicit prompt, chosen, rejected
    train = concatenate([ds, other])   # sources of one split, which must share a kind

In (`normalise`): one source's rows as `sources.load_source` gives them: `chosen`, `rejected` and,
if the source has one, `prompt`, holding whatever the file held, plus `source` (str,
"path[split]") and `row` (int, the row's index in that source). Formats: prefopt's own (`SCHEMAS`,
TRL's), and LLaMA-Factory's sharegpt and alpaca ranking rows, which reach here already read as
chat rows (`llamafactory`, called by `sources`), so they are checked like any others.

Out: the normalised rows, exactly `prompt`, `chosen`, `rejected`, `source`, `row`. The three pair
columns are all strings ("text") or all lists of {role: str, content: str} messages ("chat"); no
value is null; chat answers hold only the assistant's messages and end with its reply; a prompt
the rows left implicit (chosen/rejected alone) is their shared beginning, taken out of them. An
answer may still be empty or blank: `tokens` drops and counts it. Refused where TRL would train
on it: a system, user or tool turn inside an answer (every message of an answer is scored).
Every refusal names the source, the row and the column. `sources` reads `PAIR` and `SCHEMAS`
from here.
"""

import json

import pyarrow.compute as pc
from datasets import Dataset, LargeList, List, Value, concatenate_datasets

from .errors import PrefoptError
from .fingerprint import fingerprint

PAIR = ("prompt", "chosen", "rejected")
PROVENANCE = ("source", "row")
SCHEMAS = (
    "(a) prompt/chosen/rejected as plain strings; (b) prompt/chosen/rejected as chat message lists "
    "[{role, content}, ...], chosen and rejected holding only the assistant's messages; (c) chosen/rejected alone, "
    "whose shared beginning (text, or leading messages) is the prompt"
)
KIND_NAMES = {"text": "a plain string", "chat": "a chat message list"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
SHAREGPT_FIX = ("rename the keys from → role and value → content, and the roles human → user and gpt → assistant "
                "(system stays system); prompt, chosen and rejected are each a list of {role, content} messages")


def at(ds: Dataset, i: int) -> str:
    """Where row `i` of `ds` came from, for messages: 'data.jsonl[train] row 7'."""
    row = ds[i]
    return f"{row['source']} row {row['row']}"


def common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two sequences (strings, id lists, message lists)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def column_kind(feature) -> str | None:
    """'text' for a string column, 'chat' for a list of {role, content} string messages (or only
    empty lists, which are blank answers), else None.

    datasets reads a JSON column whose rows disagree in type (a string here, a list there) as a
    `Json` feature, which is neither.
    """
    if _is_string(feature):
        return "text"
    if not isinstance(feature, (List, LargeList)):
        return None
    message = feature.feature
    if isinstance(message, dict) and _is_string(message.get("role")) and _is_string(message.get("content")) \
            or message == Value("null"):
        return "chat"
    return None


def _value_kind(value) -> str | None:
    """`column_kind` for one row's value."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and not any(_message_problem(m) for m in value):
        return "chat"
    return None


def short(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:60]


def _describe(value) -> str:
    """What a value is, in the words of the accepted schemas."""
    if value is None:
        return "null (no value)"
    kind = _value_kind(value)
    if kind is not None:
        return KIND_NAMES[kind]
    if isinstance(value, list):
        k, problem = next((k, p) for k, m in enumerate(value) if (p := _message_problem(m)))
        return f"a list whose item {k} {problem}"
    if _is_sharegpt(value):
        return f"one message {short(value)} written {{from, value}} (ShareGPT style), not a list of {{role, content}}"
    return f"the {type(value).__name__} {short(value)}"


def _is_sharegpt(message) -> bool:
    """A message written ShareGPT's way, {from, value}, instead of {role, content}."""
    return (isinstance(message, dict) and message.get("role") is None and message.get("from") is not None
            and "value" in message)


def _message_problem(message) -> str | None:
    """Why `message` is not a chat message {role, content} with string values; None if it is one."""
    if not isinstance(message, dict):
        return f"is not a message {{role, content}} but {short(message)}"
    if _is_sharegpt(message):
        return "is written {from, value} (ShareGPT style), not {role, content}"
    for key in ("role", "content"):
        if message.get(key) is None:
            return f"has no {key}"
        if not isinstance(message[key], str):
            return f"has {key} {short(message[key])} ({type(message[key]).__name__}), not a string"
    return None


def _bad_column(ds: Dataset, column: str) -> PrefoptError:
    """The error for a column that is neither all strings nor all message lists, at the first row
    that shows it: one that differs from the rows before it, or row 0 when all are alike."""
    values = ds[column]
    kinds = [_value_kind(v) for v in values]
    first = next((i for i, kind in enumerate(kinds) if kind is not None), None)
    odd = 0 if first is None else next((i for i, kind in enumerate(kinds) if kind != kinds[first]), 0)
    earlier = f", but {at(ds, first)} holds {KIND_NAMES[kinds[first]]}" if first is not None and first < odd else ""
    value = values[odd]
    if _is_sharegpt(value) or isinstance(value, list) and any(_is_sharegpt(m) for m in value):
        fix = f"prefopt reads chat messages as {{role, content}}: {SHAREGPT_FIX}."
        if _is_sharegpt(value):
            fix += (" Or, as LLaMA-Factory's sharegpt ranking rows (read as they are), give the conversation up to "
                    "the answers as a 'conversations' list beside single-message chosen and rejected.")
    else:
        fix = ("A column must hold plain strings in every row, or chat message lists [{role, content}, ...] in every "
               "row; fix that row or remove it.")
    return PrefoptError(f"{at(ds, odd)}: column '{column}' holds {_describe(value)}{earlier}. {fix} "
                        f"Accepted schemas: {SCHEMAS}.")


def normalise(ds: Dataset, num_proc: int | None = None) -> Dataset:
    """One non-empty source (with `source`/`row` columns) → explicit prompt/chosen/rejected.

    Accepted: explicit string or chat columns as they are; implicit prompt (chosen/rejected only),
    the shared beginning becomes the prompt; and TRL's special case, a string `prompt` beside chat
    answers, where the prompt is likewise taken from the conversations. Types are read from the
    column features (Arrow columns hold one type), so those checks cost nothing per row; rows are
    read only to name the one at fault, and to check conversations (`_check_chat_batch`).
    """
    kinds = {c: column_kind(ds.features[c]) for c in PAIR if c in ds.column_names}
    for column, kind in kinds.items():
        if kind is None:
            raise _bad_column(ds, column)
    _check_no_nulls(ds)
    if kinds["chosen"] != kinds["rejected"]:
        raise PrefoptError(f"{at(ds, 0)}: columns chosen and rejected differ in type (chosen is "
                           f"{KIND_NAMES[kinds['chosen']]}, rejected is {KIND_NAMES[kinds['rejected']]}); make both "
                           "plain strings or both chat message lists.")
    prompt_kind = kinds.get("prompt")
    if prompt_kind == "chat" and kinds["chosen"] == "text":
        raise PrefoptError(f"{at(ds, 0)}: column prompt is a chat message list but chosen and rejected are plain "
                           "strings; give the answers as messages too ([{role: assistant, content: ...}]), or the "
                           "prompt as a string.")
    if prompt_kind == "text" and kinds["chosen"] == "chat":
        # TRL's rule: a string prompt beside conversations is a summary of them, not what the model sees
        ds = ds.remove_columns("prompt")
        prompt_kind = None
    if kinds["chosen"] == "chat":
        ds.map(_check_chat_batch, batched=True, num_proc=num_proc, fn_kwargs={"implicit": prompt_kind is None},
               desc="Checking conversations", new_fingerprint=fingerprint(ds, "check", prompt_kind is None))
    if prompt_kind is None:
        ds = ds.map(_extract_prompt_batch, batched=True, num_proc=num_proc, desc="Extracting implicit prompts",
                    new_fingerprint=fingerprint(ds, "extract"))
    return ds.select_columns([*PAIR, *PROVENANCE])


def _check_no_nulls(ds: Dataset):
    for column in PAIR:
        if column in ds.column_names:
            first = pc.index(pc.is_null(ds.with_format("arrow")[column]), True).as_py()
            if first >= 0:
                raise PrefoptError(f"{at(ds, first)}: column '{column}' has no value (missing or null); fill it "
                                   "in or remove the row.")


def _check_chat_batch(batch: dict, implicit: bool):
    """Every message a {role, content} of strings; each non-empty answer ends with the assistant's
    reply and, once the prompt is taken out, holds nothing but the assistant's messages; an explicit
    prompt is not repeated in the answers.

    Every message of an answer is scored: a system or user turn there would be trained on as the
    model's own words. With an implicit prompt, the prompt is the messages chosen and rejected share
    (TRL's `extract_prompt`, `_prompt_end`), so multi-turn conversations that differ only in their
    final assistant messages keep working.
    """
    for i, (source, row) in enumerate(zip(batch["source"], batch["row"])):
        where = f"{source} row {row}"
        for column in PAIR:
            for k, message in enumerate(batch[column][i] if column in batch else []):
                problem = _message_problem(message)
                if problem:
                    fix = (SHAREGPT_FIX if _is_sharegpt(message)
                           else "every message needs a role and a content, both strings")
                    raise PrefoptError(f"{where}: column '{column}', message {k} {problem}; {fix}.")
        chosen, rejected = batch["chosen"][i], batch["rejected"][i]
        if not chosen or not rejected:
            continue  # an empty answer: dropped and counted when tokenizing
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            role = answer[-1]["role"]
            if role != "assistant":
                raise PrefoptError(f"{where}: the last message of '{column}' is from the {role}{role_hint(role)}, "
                                   "not the assistant; each answer must end with the assistant's reply.")
        prompt = batch["prompt"][i] if not implicit else None
        if prompt and any(answer[:len(prompt)] == prompt for answer in (chosen, rejected)):
            raise PrefoptError(f"{where}: chosen or rejected repeats the prompt's messages, so the model would see "
                               "the prompt twice; keep only the replies in chosen and rejected, or drop the prompt "
                               "column to take it from the conversations.")
        start = _prompt_end(chosen, rejected) if implicit else 0
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            k = next((k for k in range(start, len(answer)) if answer[k]["role"] != "assistant"), None)
            if k is not None:
                raise _turn_in_answer(where, column, k, start, chosen, rejected, implicit)


def _turn_in_answer(where: str, column: str, k: int, start: int, chosen: list, rejected: list,
                    implicit: bool) -> PrefoptError:
    """The error for message `k` of `column`, not the assistant's, inside the answer (from `start`)."""
    role = (chosen if column == "chosen" else rejected)[k]["role"]
    head = (f"{where}: column '{column}', message {k} is from the {role}{role_hint(role)}, inside the answer: every "
            "message of an answer is scored as the model's reply, so this turn would be trained on as the model's "
            "own words.")
    if not implicit:
        return PrefoptError(f"{head} Move it, and the messages before it, into the prompt column (the conversation "
                            "up to the answer), keeping only the assistant's messages in chosen and rejected.")
    d = common_prefix_len(chosen, rejected)
    shared = {0: "none", 1: "the first message"}.get(start, f"the first {start} messages")
    return PrefoptError(
        f"{head} With no prompt column, the prompt is the messages chosen and rejected share (here {shared}) and "
        f"the answer is the rest; they first differ at message {d} (chosen: {_turn(chosen, d)}; "
        f"rejected: {_turn(rejected, d)}). Make the conversations identical up to the assistant's final reply, or "
        "give the prompt in a 'prompt' column and only the assistant's messages in chosen and rejected."
    )


def _turn(messages: list, k: int) -> str:
    """Message `k` for an error: 'user: "Sort 2 1"', or 'no message' past the end."""
    return f"{messages[k]['role']}: {short(messages[k]['content'])}" if k < len(messages) else "no message"


def role_hint(role: str) -> str:
    """For ShareGPT's role names, what they are called here."""
    if role in SHAREGPT_ROLES:
        return f" ('{role}' is ShareGPT's name for the {SHAREGPT_ROLES[role]}: rename human → user, gpt → assistant)"
    return ""


def _extract_prompt_batch(batch: dict) -> dict:
    ends = [_prompt_end(c, r) for c, r in zip(batch["chosen"], batch["rejected"])]
    return {
        "prompt": [c[:end] for c, end in zip(batch["chosen"], ends)],
        "chosen": [c[end:] for c, end in zip(batch["chosen"], ends)],
        "rejected": [r[end:] for r, end in zip(batch["rejected"], ends)],
    }


def _prompt_end(chosen, rejected) -> int:
    """Where the implicit prompt ends in chosen and rejected (strings or message lists).

    TRL's `extract_prompt`: the longest shared prefix, but with the space before the answers moved
    into them; when one answer is a prefix of the other, the last shared element stays with the
    answers. Unlike TRL, a divergence at the very first character moves no space (TRL looks at
    the string's last character there) and empty answers give an empty prompt (TRL crashes).
    """
    shared = common_prefix_len(chosen, rejected)
    if shared == min(len(chosen), len(rejected)):
        return max(shared - 1, 0)
    if shared > 0 and chosen[shared - 1] == " ":  # never true for messages
        return shared - 1
    return shared


def concatenate(parts: list[Dataset]) -> Dataset:
    """One dataset from normalised sources, which must share a schema (all text or all chat)."""
    first = parts[0]
    for part in parts[1:]:
        if column_kind(part.features["chosen"]) != column_kind(first.features["chosen"]):
            raise PrefoptError(
                f"{first[0]['source']} holds {KIND_NAMES[column_kind(first.features['chosen'])]} per answer but "
                f"{part[0]['source']} holds {KIND_NAMES[column_kind(part.features['chosen'])]}; datasets mixed into "
                "one split must use the same schema, so convert one of them."
            )
    try:
        return concatenate_datasets(parts)
    except ValueError as e:
        names = ", ".join(p[0]["source"] for p in parts)
        raise PrefoptError(f"{names}: cannot be combined ({e}). Give their messages the same keys "
                           "(e.g. only role and content).") from e
