"""The chat template: installed on the tokenizer, and chat rows rendered to text with it.

    added = setup_chat_template(tokenizer, cfg.data.chat_template)   # True: the vocabulary grew
    style = rendering(tokenizer, cfg.data)                            # layout, roles, empty system turn
    prompt, chosen, rejected = render(tokenizer, *messages, "data.jsonl[train] row 7", style)

In (`render`): one normalised chat row (`rows.normalise`): prompt, chosen and rejected message
lists, the answers holding only the assistant's messages. Out: three strings, in one of two
layouts (`LAYOUTS`, the key `completion_layout`):

- `trl` (the default), as TRL's `apply_chat_template` makes them: the prompt rendered with the
  generation prompt (so the assistant header is part of the prompt), each answer the text its
  conversation adds to it.
- `simpo_repo`, as the SimPO repository's `run_simpo.py` makes them: the prompt rendered without
  the generation prompt, each answer's messages rendered alone with the template's leading BOS
  text removed, so the assistant header is part of the completion (scored, and counted in the
  length SimPO normalises by). A template that renders an answer alone otherwise than inside its
  conversation (Qwen2's default system turn opening every conversation) is refused rather than
  trained on: the repository would score that text as the answer. run_simpo.py also replaces the
  template of any model whose name contains "mistral" with its own; prefopt never replaces a
  user's template, and ships that one as `chat_template: simpo_repo_mistral`.

With `auto_insert_empty_system_msg` (default: true for `simpo_repo`, as the SimPO repository and
the alignment handbook do), a prompt that does not start with a system message gets an empty one
first, where the template takes a system role (`accepts_system`: it names one, the SimPO
repository's test, and renders one without raising); a template that does not (Llama 3's names
none, Gemma's refuses it) gets none, and `insert_note` says so once.
Refused where TRL would render it: a prompt role the template does not know, a prompt that does
not end with a user, tool or assistant message; any error the template raises is named with the
row and the template's own message.
"""

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError

from .errors import PrefoptError
from .rows import common_prefix_len, role_hint

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# The roles of transformers' chat message format; `tool` (a tool's result) is rendered by tool-use
# templates. A template may accept more (Llama 3.1's `ipython`): see `template_roles`.
ROLES = ("system", "user", "assistant", "tool")
# Named templates shipped in prefopt/templates/ besides ChatML. `simpo_repo_mistral` renders what the
# template the SimPO repository's run_simpo.py puts on every Mistral tokenizer renders (it replaces
# the tokenizer's own, which refuses an assistant turn rendered alone): a system message folded into
# the first user turn, `[INST] user [/INST]`, then ` answer </s>`. prefopt never substitutes it: a
# config asks for it by name.
NAMED_TEMPLATES = {"simpo_repo_mistral": "simpo_repo_mistral.jinja"}
# What each completion_layout trains; `config explain` names the run's.
LAYOUTS = {
    "trl": "TRL's: the prompt rendered with the generation prompt (the assistant header is the prompt's); each "
           "completion is the text its answer adds to the conversation",
    "simpo_repo": "the SimPO repository's run_simpo.py: the prompt rendered without the generation prompt; each "
                  "completion is its answer rendered alone (the assistant header scored and counted in the "
                  "length); no EOS clean-up; prefopt's truncation",
}


def setup_chat_template(tokenizer, chat_template: str | None) -> bool:
    """Install `chat_template` on `tokenizer` and give it a pad token; True if the vocab grew.

    None keeps the tokenizer's template; "chatml" installs ChatML (adding <|im_start|>/<|im_end|>
    as special tokens where missing, <|im_end|> becoming eos); a name in `NAMED_TEMPLATES` installs
    that template as it is (its tokens are the model's); a `.jinja` path is read; a string
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
    elif chat_template in NAMED_TEMPLATES:
        tokenizer.chat_template = files("prefopt").joinpath(f"templates/{NAMED_TEMPLATES[chat_template]}").read_text()
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
    raise PrefoptError(f"chat_template: {value!r} is not chatml, a .jinja file or a Jinja template string (nor a "
                       f"template prefopt ships: {', '.join(NAMED_TEMPLATES)}); use one of those, or leave it unset "
                       "to keep the tokenizer's own.")


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


EMPTY_SYSTEM = {"role": "system", "content": ""}


@dataclass(frozen=True)
class Rendering:
    """How chat rows are rendered in one run: the layout (`LAYOUTS`), the roles the template knows
    (`template_roles`), and whether a prompt without a system message gets an empty one."""

    layout: str = "trl"
    roles: tuple[str, ...] = ROLES
    empty_system: bool = False


def completion_layout(data) -> str:
    """`data.completion_layout`, refused unless it is one of `LAYOUTS`."""
    if data.completion_layout not in LAYOUTS:
        raise PrefoptError(f"completion_layout: {data.completion_layout!r} is not one of {', '.join(LAYOUTS)}; use "
                           "trl (TRL's layout, the default) or simpo_repo (the SimPO repository's).")
    return data.completion_layout


def wants_empty_system(data) -> bool:
    """`auto_insert_empty_system_msg` resolved: as given, else true for the simpo_repo layout only."""
    given = data.auto_insert_empty_system_msg
    return completion_layout(data) == "simpo_repo" if given is None else bool(given)


def accepts_system(tokenizer) -> bool:
    """Whether an empty system turn is inserted with this tokenizer's template: its source names a
    system role (the word "system", or ChatML's <|im_start|>: the test of the SimPO repository and the
    alignment handbook, so Llama 3's template, which never names one, gets none there either) and it
    renders a conversation opened by an empty system message without raising (Gemma's names it to
    raise 'System role not supported')."""
    template = tokenizer.chat_template
    source = "\n".join(template.values()) if isinstance(template, dict) else template or ""
    if "system" not in source and CHATML_TOKENS[0] not in source:
        return False
    try:
        tokenizer.apply_chat_template([EMPTY_SYSTEM, {"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # noqa: BLE001 - whatever the template raises, it does not take a system turn
        return False
    return True


def rendering(tokenizer, data) -> Rendering:
    """The run's `Rendering` for `tokenizer`'s template and `data`'s keys."""
    return Rendering(layout=completion_layout(data), roles=tuple(template_roles(tokenizer.chat_template)),
                     empty_system=wants_empty_system(data) and accepts_system(tokenizer))


def insert_note(tokenizer, data) -> str | None:
    """The note a run prints once when an empty system turn was asked for and the template refuses one."""
    if tokenizer.chat_template is None or not wants_empty_system(data) or accepts_system(tokenizer):
        return None
    return ("auto_insert_empty_system_msg: the chat template names no system role or refuses one, so no empty "
            "system turn was inserted")


def render(tokenizer, prompt: list, chosen: list, rejected: list, where: str,
           style: Rendering = Rendering()) -> tuple[str, str, str]:
    """Chat rows → (prompt, chosen, rejected) text in `style.layout`. Every prompt message's role is
    one of `style.roles`; the answers hold only the assistant's messages (`normalise`)."""
    _check_roles(prompt, where, style.roles)
    last = prompt[-1]["role"] if prompt else None
    if last not in ("user", "tool", "assistant"):
        raise PrefoptError(f"{where}: the prompt must end with a user, tool or assistant message (it ends with "
                           f"{last or 'nothing'}); chosen and rejected should share the conversation up to the answer.")
    inserted = style.empty_system and prompt[0]["role"] != "system"
    if inserted:
        prompt = [EMPTY_SYSTEM, *prompt]
    try:
        if style.layout == "simpo_repo":
            return _render_simpo_repo(tokenizer, prompt, chosen, rejected, where)
        return _render_trl(tokenizer, prompt, chosen, rejected, last)
    except TemplateSyntaxError as e:
        raise PrefoptError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix chat_template, "
                           "or the template saved with the tokenizer.") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # the template's own raise_exception ("System role not supported"), or its code failing on this row
        raise PrefoptError(_template_refusal(e, where, prompt, style, inserted)) from None


def generation_prompt(tokenizer, prompt: list, where: str, style: Rendering = Rendering()) -> str:
    """The text a policy answers a chat prompt after (`prefopt pairs`): the prompt as `render` gives
    it to training (its roles checked, the empty system turn where the run inserts one), with the
    template's generation prompt, so what is sampled is what the pair trains."""
    _check_roles(prompt, where, style.roles)
    inserted = style.empty_system and prompt[0]["role"] != "system"
    if inserted:
        prompt = [EMPTY_SYSTEM, *prompt]
    try:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as e:
        raise PrefoptError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix chat_template, "
                           "or the template saved with the tokenizer.") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise PrefoptError(_template_refusal(e, where, prompt, style, inserted)) from None


def _check_roles(prompt: list, where: str, roles) -> None:
    for k, message in enumerate(prompt):
        role = message["role"]
        if role not in roles:
            raise PrefoptError(
                f"{where}: column 'prompt', message {k} has the role '{role}'{role_hint(role)}, which the chat "
                f"template does not know: it would be rendered as a turn the model was never taught. Roles accepted: "
                f"{', '.join(roles)}. Give it one of those (words addressed to the model are a system or user "
                "message), or remove the message."
            )


def _template_refusal(error: Exception, where: str, prompt: list, style: Rendering, inserted: bool) -> str:
    """The one line naming the row, the template's own message and the fix."""
    head = f"{where}: the chat template cannot render this conversation ({error}); "
    if inserted:
        return head + ("it opens with the empty system turn auto_insert_empty_system_msg inserts: set "
                       "auto_insert_empty_system_msg: false, or use a chat_template that takes a system role.")
    if any(m["role"] == "system" for m in prompt):
        return head + ("remove the system turns from the rows (or fold them into the first user message), or use a "
                       "chat_template that takes a system role.")
    return head + "change the row's messages to what the template accepts, or use another chat_template."


def _render_trl(tokenizer, prompt: list, chosen: list, rejected: list, last: str) -> tuple[str, str, str]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                         continue_final_message=last == "assistant")
    with_chosen = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    with_rejected = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    # Some templates render the prompt differently once an answer follows (DeepSeek-R1 adds a token
    # with the generation prompt); the prompt is what all three renderings share.
    end = min(common_prefix_len(text, with_chosen), common_prefix_len(text, with_rejected))
    return text[:end], with_chosen[end:], with_rejected[end:]


def _render_simpo_repo(tokenizer, prompt: list, chosen: list, rejected: list, where: str) -> tuple[str, str, str]:
    """The SimPO repository's `apply_chat_template(task="simpo")`: the prompt without the generation
    prompt, each answer rendered alone, a leading BOS text removed (where the tokenizer has a BOS;
    the repository fails without one). Refused where an answer rendered alone is not the text it
    adds to its conversation."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False)
    answers = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        alone = _render_alone(tokenizer, answer, name, where)
        bos = tokenizer.bos_token
        if bos and alone.startswith(bos):
            alone = alone[len(bos):]
        in_context = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not in_context.startswith(text):
            raise PrefoptError(
                f"{where}: completion_layout simpo_repo: the chat template renders the prompt alone ending "
                f"{text[-40:]!r}, which is not how it renders the prompt before the {name} answer (a template that "
                "closes every conversation with EOS, as Phi-3's does, makes the repository train the prompt with an "
                "EOS inside); use completion_layout: trl, or a chat_template that does not.")
        if in_context[len(text):] != alone:
            raise PrefoptError(
                f"{where}: completion_layout simpo_repo: the chat template renders the {name} answer alone as "
                f"{alone[:60]!r}, not as the text it adds to the conversation ({in_context[len(text):][:60]!r}; a "
                "template that opens every conversation with a default system turn does this), so the SimPO "
                "repository would score text that is not the answer; use completion_layout: trl, or a "
                "chat_template that renders an assistant turn alone as in a conversation.")
        answers.append(alone)
    return text, answers[0], answers[1]


def _render_alone(tokenizer, answer: list, name: str, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(answer, tokenize=False)
    except TemplateSyntaxError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise PrefoptError(
            f"{where}: the chat template cannot render the {name} answer alone ({e}), which completion_layout "
            "simpo_repo does (the SimPO repository renders each answer alone); templates that check that roles "
            "alternate refuse it (Mistral's and Gemma's own: the repository replaces Mistral's, which "
            "`chat_template: simpo_repo_mistral` is, and gives Gemma 2 one in its config); use such a "
            "chat_template, or completion_layout: trl.") from None
