"""LLaMA-Factory's preference rows (sharegpt and alpaca, `ranking: true`) → prefopt's chat rows.

    fmt = layout(src.format, ds.features)       # given (data_format, dataset_info.json) or detected; None: not its
    ds = convert(ds, fmt, "data/pairs.json[train]")

In: one source's rows as read, and its format: `{formatting, columns, tags}` as a dataset_info.json
entry gives them (`dataforms` checks their keys), `{formatting: sharegpt}` for `data_format:
sharegpt`, or none, when `layout` detects sharegpt from the columns: `chosen` and `rejected` single
messages beside a `conversations` (or `messages`) list. A column `columns` leaves out has its
default name (below); an optional one is read only when present, and `history` and `system` only
when `columns` names them (a dataset_info.json entry always has `columns`: LLaMA-Factory's defaults
for them are None) — a file detected, or named by `data_format`, reads them by their names. A tag left out of `tags` keeps
its default (LLaMA-Factory leaves it unset).

Out: `prompt`, `chosen`, `rejected` as chat message lists [{role, content}], which `rows.normalise`
checks next like any chat rows. sharegpt: an optional system turn first (or the `system` column),
then turns alternating human (or observation) and gpt (or function_call), ending with the human
turn the answers reply to — what LLaMA-Factory requires of ranking rows; it skips a row that breaks
this, prefopt refuses it. Roles: human → user, gpt → assistant, system → system, observation →
tool (a tool's result), function_call → assistant (the call as the model wrote it). alpaca: the
history's [question, answer] pairs, then one user turn of instruction and input joined by "\\n"
(either left out when empty, as LLaMA-Factory joins them), the system (when not empty) first; each
answer one assistant message. Every refusal names the source, the row and the column.
"""

from datasets import Dataset, Features, LargeList, List, Value

from .errors import PrefoptError
from .fingerprint import fingerprint
from .rows import short

FORMATTINGS = ("alpaca", "sharegpt")
# LLaMA-Factory's DatasetAttr defaults
COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "history": "history", "system": "system",
                      "chosen": "chosen", "rejected": "rejected"},
           "sharegpt": {"messages": "conversations", "system": "system", "chosen": "chosen", "rejected": "rejected"}}
OPTIONAL = ("query", "history", "system")
LISTED_ONLY = ("history", "system")  # LLaMA-Factory's defaults for these are None: read only when named
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# the tags of LLaMA-Factory's OpenAI-style sharegpt entries (its dataset_info.json, e.g. for messages columns)
OPENAI_TAGS = {**TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
ROLE_OF = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool", "function_tag": "assistant",
           "system_tag": "system"}
MESSAGES = List({"role": Value("string"), "content": Value("string")})
OUT = Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES})


def layout(given: dict | None, features) -> dict | None:
    """The format to convert a source's rows from: `given`, else sharegpt when the columns show it
    (chosen and rejected single messages beside a list of messages), else None (prefopt's own)."""
    if given is not None:
        return given
    single = [features.get(c) for c in ("chosen", "rejected")]
    if not all(isinstance(f, dict) for f in single):
        return None
    for messages in ("conversations", "messages"):
        f = features.get(messages)
        if isinstance(f, (List, LargeList)) and isinstance(f.feature, dict):
            keys = set(f.feature) | set(single[0])
            tags = OPENAI_TAGS if {"role", "content"} <= keys and "from" not in keys else TAGS
            columns = {"messages": messages} | ({"system": "system"} if "system" in features else {})
            return {"formatting": "sharegpt", "columns": columns, "tags": tags}
    return None


def columns_of(fmt: dict, present: list[str]) -> dict[str, str | None]:
    """Each role's column (None: not read): the one `columns` names (it must be there); else the
    default name — for an optional role only when such a column is present, and for `history` and
    `system` only without `columns` (a dataset_info.json entry reads those only when it names them,
    as LLaMA-Factory does; a file detected or named by data_format reads them by name)."""
    given = fmt.get("columns")
    out = {}
    for role, default in COLUMNS[fmt["formatting"]].items():
        listed = (given or {}).get(role)
        if listed is not None:
            out[role] = listed
        elif role in OPTIONAL:
            named_only = given is not None and role in LISTED_ONLY
            out[role] = default if default in present and not named_only else None
        else:
            out[role] = default
    return out


def convert(ds: Dataset, fmt: dict, label: str) -> Dataset:
    """`ds`'s rows in LLaMA-Factory's `fmt` → prompt, chosen, rejected message lists (1:1, in order)."""
    columns = columns_of(fmt, ds.column_names)
    missing = [f"{c} (the {role} column)" for role, c in columns.items() if c is not None and c not in ds.column_names]
    if missing:
        names = "dataset_info.json's columns" if fmt.get("columns") is not None else "the default names"
        raise PrefoptError(f"{label}: no column {', '.join(missing)} for LLaMA-Factory's {fmt['formatting']} ranking "
                           f"rows (columns found: {ds.column_names}); name the columns in {names} or in the file.")
    tags = {**TAGS, **(fmt.get("tags") or {})}
    fn = _sharegpt_row if fmt["formatting"] == "sharegpt" else _alpaca_row
    used = [c for c in columns.values() if c is not None]

    def batch(rows: dict, indices: list[int]) -> dict:
        out = {"prompt": [], "chosen": [], "rejected": []}
        for j, i in enumerate(indices):
            row = {c: rows[c][j] for c in used}
            for key, value in zip(out, fn(row, columns, tags, f"{label} row {i}")):
                out[key].append(value)
        return out

    return ds.map(batch, batched=True, with_indices=True, remove_columns=ds.column_names, features=OUT,
                  desc=f"Reading LLaMA-Factory {fmt['formatting']} rows",
                  new_fingerprint=fingerprint(ds, "llamafactory", fmt))


def _sharegpt_row(row: dict, columns: dict, tags: dict, where: str) -> tuple[list, list, list]:
    role, content, messages = tags["role_tag"], tags["content_tag"], columns["messages"]
    turns = row[messages]
    if not isinstance(turns, list):
        raise PrefoptError(f"{where}: column '{messages}' holds {_what(turns)}, not a list of messages; give the "
                           f"conversation up to the answers as [{{{role}: ..., {content}: ...}}, ...].")
    turns = [_message(m, tags, where, f"column '{messages}', message {k}") for k, m in enumerate(turns)]
    prompt = []
    if turns and turns[0][0] == "system_tag":
        prompt.append(_system(turns[0][1]))
        turns = turns[1:]
    elif columns["system"] is not None and row[columns["system"]]:
        prompt.append(_system(_text(row[columns["system"]], where, f"column '{columns['system']}'")))
    start = len(prompt)
    for k, (tag, text) in enumerate(turns):
        expected = ("user_tag", "observation_tag") if k % 2 == 0 else ("assistant_tag", "function_tag")
        if tag not in expected:
            raise _turn_order(where, messages, k + start, tag, expected, tags)
        prompt.append({"role": ROLE_OF[tag], "content": text})
    if len(turns) % 2 == 0:
        last = f"the {tags[turns[-1][0]]} turn" if turns else "no turn"
        raise PrefoptError(
            f"{where}: column '{messages}' ends with {last}; in ranking rows the conversation ends with the "
            f"{tags['user_tag']} (or {tags['observation_tag']}) turn that chosen and rejected answer. Move the final "
            f"{tags['assistant_tag']} reply into chosen and rejected, or drop the row.")
    answers = [_answer(row, columns[c], tags, where) for c in ("chosen", "rejected")]
    return prompt, *answers


def _message(m, tags: dict, where: str, what: str) -> tuple[str, str]:
    """One message → (its tag's name, e.g. 'user_tag', its text)."""
    role, content = tags["role_tag"], tags["content_tag"]
    if not isinstance(m, dict) or m.get(role) is None:
        found = f"has no '{role}'" if isinstance(m, dict) else f"is {_what(m)}, not a message"
        keys = f" (keys found: {sorted(k for k, v in m.items() if v is not None)})" if isinstance(m, dict) else ""
        raise PrefoptError(f"{where}: {what} {found}{keys}; the tags in use read a message as {{{role}, {content}}} "
                           "(set role_tag and content_tag in dataset_info.json's tags for other keys).")
    by_value = {tags[t]: t for t in ROLE_OF if tags.get(t) is not None}
    if m[role] not in by_value:
        known = ", ".join(f"{tags[t]} ({t})" for t in ROLE_OF if tags.get(t) is not None)
        raise PrefoptError(f"{where}: {what} is from '{m[role]}', which is none of the tags in use: {known}. Give it "
                           "one of those, or name its role in dataset_info.json's tags.")
    return by_value[m[role]], _text(m.get(content), where, f"{what}'s '{content}'")


def _turn_order(where: str, messages: str, k: int, tag: str, expected: tuple, tags: dict) -> PrefoptError:
    wanted = " or ".join(tags[t] for t in expected)
    return PrefoptError(
        f"{where}: column '{messages}', message {k} is from {tags[tag]} where {wanted} comes. LLaMA-Factory's ranking "
        f"rows, and prefopt, take an optional {tags['system_tag']} turn first, then turns alternating "
        f"{tags['user_tag']} (or {tags['observation_tag']}) and {tags['assistant_tag']} (or {tags['function_tag']}), "
        f"ending with the {tags['user_tag']} turn the answers reply to; merge or drop the turns out of order.")


def _answer(row: dict, column: str, tags: dict, where: str) -> list[dict]:
    value = row[column]
    if not isinstance(value, dict):
        raise PrefoptError(
            f"{where}: column '{column}' holds {_what(value)}; in LLaMA-Factory's sharegpt ranking rows each answer "
            f"is one message {{{tags['role_tag']}: {tags['assistant_tag']}, {tags['content_tag']}: ...}}: keep only "
            "the final reply there (earlier turns belong in the conversation).")
    tag, text = _message(value, tags, where, f"column '{column}'")
    if tag not in ("assistant_tag", "function_tag"):
        raise PrefoptError(f"{where}: column '{column}' is from {tags[tag]}, but an answer is the model's: from "
                           f"{tags['assistant_tag']} (or {tags['function_tag']}).")
    return [{"role": "assistant", "content": text}]


def _alpaca_row(row: dict, columns: dict, tags: dict, where: str) -> tuple[list, list, list]:
    prompt = []
    if columns["system"] is not None and row[columns["system"]]:
        prompt.append(_system(_text(row[columns["system"]], where, f"column '{columns['system']}'")))
    history = row[columns["history"]] if columns["history"] is not None else None
    for k, pair in enumerate(history or []):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise PrefoptError(f"{where}: column '{columns['history']}', item {k} is {_what(pair)}; the history is a "
                               "list of [question, answer] pairs of strings.")
        what = f"column '{columns['history']}', item {k}"
        prompt += [{"role": "user", "content": _text(pair[0], where, what)},
                   {"role": "assistant", "content": _text(pair[1], where, what)}]
    parts = [row[c] for c in (columns["prompt"], columns["query"]) if c is not None and row[c]]
    query = "\n".join(_text(p, where, "the instruction and input columns") for p in parts)  # "prompt\nquery"
    prompt.append({"role": "user", "content": query})
    answers = [[{"role": "assistant", "content": _text(row[columns[c]], where, f"column '{columns[c]}'")}]
               for c in ("chosen", "rejected")]
    return prompt, *answers


def _system(text: str) -> dict:
    return {"role": "system", "content": text}


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise PrefoptError(f"{where}: {what} holds {_what(value)}, not a string; give the text there.")
    return value


def _what(value) -> str:
    if value is None:
        return "null (no value)"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"the {type(value).__name__} {short(value)}"
