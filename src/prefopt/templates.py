"""The chat template: installed on the tokenizer, and chat rows rendered to text with it.

    added = setup_chat_template(tokenizer, cfg.data.chat_template)   # True: the vocabulary grew
    roles = template_roles(tokenizer.chat_template)
    prompt, chosen, rejected = render(tokenizer, *messages, "data.jsonl[train] row 7", roles)

In (`render`): one normalised chat row (`rows.normalise`): prompt, chosen and rejected message
lists, the answers holding only the assistant's messages. Out: three strings, as TRL's
`apply_chat_template` makes them: the prompt rendered with the generation prompt (so the
assistant header is part of the prompt), each answer the text its conversation adds to it.
Refused where TRL would render it: a prompt role the template does not know, a prompt that does
not end with a user, tool or assistant message; the template's own errors are named.
"""

import re
from importlib.resources import files
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError

from .errors import PrefoptError
from .rows import common_prefix_len, role_hint

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# The roles of transformers' chat message format; `tool` (a tool's result) is rendered by tool-use
# templates. A template may accept more (Llama 3.1's `ipython`): see `template_roles`.
ROLES = ("system", "user", "assistant", "tool")


def setup_chat_template(tokenizer, chat_template: str | None) -> bool:
    """Install `chat_template` on `tokenizer` and give it a pad token; True if the vocab grew.

    None keeps the tokenizer's template; "chatml" installs ChatML (adding <|im_start|>/<|im_end|>
    as special tokens where missing, <|im_end|> becoming eos); a `.jinja` path is read; a string
    with `{%` or `{{` is the template itself. Calling it again with the same value changes
    nothing (and returns False): `data.prepare` calls it, and a caller may have already.
    """
    added = 0
    if chat_template == "chatml":
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.all_special_tokens]
        if missing:
            added = tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = files("prefopt").joinpath("templates/chatml.jinja").read_text()
        # Each ChatML turn ends with <|im_end|>: generation must stop there, and completions end with it.
        tokenizer.eos_token = "<|im_end|>"
    elif chat_template is not None:
        tokenizer.chat_template = _read_template(chat_template)
    if tokenizer.pad_token is None:
        # Safe because attention and loss masks come from sequence lengths, never from pad ids.
        tokenizer.pad_token = tokenizer.eos_token
    return added > 0


def _read_template(value: str) -> str:
    if value.endswith(".jinja"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise PrefoptError(f"chat_template: no such file {value}; fix the path.")
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise PrefoptError(f"chat_template: {value!r} is not chatml, a .jinja file or a Jinja template string; use "
                       "one of those, or leave it unset to keep the tokenizer's own.")


# `message['role'] == 'ipython'`, `message.role != "system"`, `message['role'] in ['tool', 'ipython']`
_ROLE_COMPARED = re.compile(r"""role['"\]]*\s*[!=]=\s*['"]([^'"]+)['"]""")
_ROLE_IN = re.compile(r"""role['"\]]*\s+(?:not\s+)?in\s*[\[(]([^\])]*)[\])]""")


def template_roles(template: str | dict) -> list[str]:
    """The roles a conversation may use with `template`: `ROLES`, and every role the template's
    source compares a message's role with (a template that names a role renders it on purpose;
    one that renders any role generically, as ChatML does, gives an unknown role no meaning)."""
    source = "\n".join(template.values()) if isinstance(template, dict) else template
    named = set(_ROLE_COMPARED.findall(source))
    for group in _ROLE_IN.findall(source):
        named.update(re.findall(r"""['"]([^'"]+)['"]""", group))
    return [*ROLES, *sorted(named - set(ROLES))]


def render(tokenizer, prompt: list, chosen: list, rejected: list, where: str,
            roles: list[str]) -> tuple[str, str, str]:
    """Chat rows → (prompt, chosen, rejected) text, as TRL's `apply_chat_template`. Every prompt
    message's role is one of `roles` (`template_roles`); the answers hold only the assistant's
    messages (`normalise`)."""
    for k, message in enumerate(prompt):
        role = message["role"]
        if role not in roles:
            raise PrefoptError(
                f"{where}: column 'prompt', message {k} has the role '{role}'{role_hint(role)}, which the chat "
                f"template does not know: it would be rendered as a turn the model was never taught. Roles accepted: "
                f"{', '.join(roles)}. Give it one of those (words addressed to the model are a system or user "
                "message), or remove the message."
            )
    last = prompt[-1]["role"] if prompt else None
    if last not in ("user", "tool", "assistant"):
        raise PrefoptError(f"{where}: the prompt must end with a user, tool or assistant message (it ends with "
                           f"{last or 'nothing'}); chosen and rejected should share the conversation up to the answer.")
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                             continue_final_message=last == "assistant")
        with_chosen = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
        with_rejected = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    except TemplateSyntaxError as e:
        raise PrefoptError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix chat_template, "
                           "or the template saved with the tokenizer.") from None
    except TemplateError as e:  # the template's own raise_exception, e.g. "System role not supported"
        raise PrefoptError(f"{where}: the chat template cannot render this conversation ({e}); change the row's "
                           "messages to what the template accepts, or use another chat_template.") from None
    # Some templates render the prompt differently once an answer follows (DeepSeek-R1 adds a token
    # with the generation prompt); the prompt is what all three renderings share.
    end = min(common_prefix_len(text, with_chosen), common_prefix_len(text, with_rejected))
    return text[:end], with_chosen[end:], with_rejected[end:]
