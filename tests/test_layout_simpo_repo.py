"""completion_layout: simpo_repo, token for token against the SimPO repository's formatting.

`repo_formatting` below re-implements, from a reading of the repository (scripts/run_simpo.py's
`apply_chat_template` for task "simpo", the alignment handbook's `maybe_insert_system_message`,
and scripts/simpo_trainer.py's `tokenize_row` / `build_tokenized_answer` without truncation), what
the repository trains; prefopt's ids are compared with it on the template families as the models
ship them (template_families.py). The repository's Mistral template, which run_simpo.py puts on
every Mistral tokenizer, is written out here as the repository has it and compared with prefopt's
`chat_template: simpo_repo_mistral`.
"""

import datasets
import pytest

from data_helpers import CHAT_ROWS, assistant, in_memory, user
from prefopt.config import DataArgs
from prefopt.data import tokenize_pairs
from prefopt.errors import PrefoptError
from prefopt.rows import normalise
from prefopt.templates import LAYOUTS, setup_chat_template
from template_families import family_tokenizer

datasets.disable_progress_bars()

# run_simpo.py's MISTRAL_CHAT_TEMPLATE, as the repository has it
REPO_MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'].strip() + '\\n\\n' %}{% else %}{% set loop_messages = messages %}{% set system_message = "
    "'' %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}{% set content = system_message + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' "
    "%}{{ '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
    "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def repo_formatting(row: dict, tokenizer, insert_system: bool = True) -> dict:
    """side → (prompt ids, completion ids) as the SimPO repository makes them (no truncation)."""
    prompt = list(row["prompt"])
    template = tokenizer.chat_template
    # maybe_insert_system_message: only where the template's text names a system role (or is ChatML)
    if insert_system and prompt[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        prompt = [{"role": "system", "content": ""}, *prompt]
    text_prompt = tokenizer.apply_chat_template(prompt, tokenize=False)  # no generation prompt

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids, out = encode(text_prompt), {}
    for side in ("chosen", "rejected"):
        answer = tokenizer.apply_chat_template(row[side], tokenize=False)  # the answer's messages alone
        bos = tokenizer.bos_token  # the repository's startswith(None) fails without one: skipped here
        if bos is not None and answer.startswith(bos):
            answer = answer[len(bos):]
        full = encode(text_prompt + answer)
        start = len(prompt_ids) if full[:len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
        p, a = full[:start], full[start:]
        if tokenizer.bos_token_id is not None and (not p or p[0] != tokenizer.bos_token_id):
            p = [tokenizer.bos_token_id] + p
        if not a or a[-1] != tokenizer.eos_token_id:
            a = a + [tokenizer.eos_token_id]
        out[side] = (p, a)
    return out


def prefopt_formatting(rows: list[dict], tokenizer, **data) -> list[dict]:
    kept, report = tokenize_pairs(normalise(in_memory(rows)), tokenizer,
                                  DataArgs(completion_layout="simpo_repo", **data))
    assert report["kept"] == len(rows)
    return list(kept)


# (family, chat_template given to prefopt, the template the repository runs with)
CASES = {
    "llama3": ("llama3", None, None),  # its template names no system role: no empty system turn, as in the repository
    "zephyr": ("zephyr", None, None),  # an empty <|system|> turn, visible
    "mistral": ("mistral", "simpo_repo_mistral", REPO_MISTRAL),  # the repository's own Mistral template
    "chatml": ("chatml", None, None),  # no BOS
    "gemma2": ("gemma2_simpo_config", None, None),  # the template the repository's Gemma 2 config sets
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_the_repositorys(case):
    family, ours, theirs = CASES[case]
    tokenizer = family_tokenizer(family)
    setup_chat_template(tokenizer, ours)
    reference = family_tokenizer(family, template=theirs)
    for row, mine in zip(CHAT_ROWS, prefopt_formatting(CHAT_ROWS, tokenizer), strict=True):
        repo = repo_formatting(row, reference)
        for side in ("chosen", "rejected"):
            p, a = repo[side]
            assert mine["prompt_ids"] == p, (mine["row"], side, tokenizer.decode(mine["prompt_ids"]))
            assert mine[f"{side}_ids"] == a, (mine["row"], side, tokenizer.decode(mine[f"{side}_ids"]))


def test_prefopts_mistral_template_renders_the_repositorys_text():
    ours, theirs = family_tokenizer("mistral"), family_tokenizer("mistral", template=REPO_MISTRAL)
    setup_chat_template(ours, "simpo_repo_mistral")
    conversations = [row["prompt"] + row["chosen"] for row in CHAT_ROWS]
    conversations += [[{"role": "system", "content": "  Be brief. "}, user(" hi "), assistant("yo\n")],
                      [assistant(" Alone. ")], [{"role": "system", "content": ""}, user("x")]]
    for messages in conversations:
        text = theirs.apply_chat_template(messages, tokenize=False)
        assert ours.apply_chat_template(messages, tokenize=False) == text


def test_the_assistant_header_moves_from_the_prompt_to_the_completion():
    tokenizer = family_tokenizer("llama3")
    rows = CHAT_ROWS[:1]
    (trl,), _ = tokenize_pairs(normalise(in_memory(rows)), tokenizer, DataArgs())
    (repo,) = prefopt_formatting(rows, tokenizer)
    header = tokenizer("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    assert trl["prompt_ids"] == repo["prompt_ids"] + header
    assert repo["chosen_ids"] == header + trl["chosen_ids"]
    assert repo["length"] == trl["length"] + len(header)  # the header is in both completions, the prompt once


def test_no_eos_clean_up_as_in_the_repository():
    tokenizer = family_tokenizer("zephyr")
    (row,) = prefopt_formatting(CHAT_ROWS[:1], tokenizer)
    assert tokenizer.convert_ids_to_tokens(row["chosen_ids"][-3:]) == ["</s>", "Ċ", "</s>"]


def test_truncation_is_prefopts_and_keeps_bos():
    tokenizer = family_tokenizer("zephyr")
    (full,) = prefopt_formatting(CHAT_ROWS[1:2], tokenizer)
    (cut,) = prefopt_formatting(CHAT_ROWS[1:2], tokenizer, max_prompt_length=8, truncation_mode="keep_end")
    assert cut["prompt_ids"] == [tokenizer.bos_token_id] + full["prompt_ids"][-7:]
    assert cut["chosen_ids"] == full["chosen_ids"]


@pytest.mark.parametrize("family, message", [
    ("qwen2", "renders the chosen answer alone as '<|im_start|>system\\nYou are a helpful assistant."),
    ("mistral", "cannot render the chosen answer alone (Conversation roles must alternate"),
    ("gemma", "cannot render the chosen answer alone (Conversation roles must alternate"),
    ("phi3", "<|end|>\\n<|endoftext|>', which is not how it renders the prompt before the chosen answer"),
])
def test_templates_that_cannot_render_an_answer_alone_are_refused(family, message):
    with pytest.raises(PrefoptError, match="^mem\\[train\\] row 0: ") as refused:
        prefopt_formatting(CHAT_ROWS[:1], family_tokenizer(family))
    assert message in str(refused.value)
    assert "completion_layout: trl" in str(refused.value)


def test_the_layouts_are_described_and_an_unknown_one_is_refused():
    assert set(LAYOUTS) == {"trl", "simpo_repo"} and all(LAYOUTS.values())
    with pytest.raises(PrefoptError, match="^completion_layout: 'simpo' is not one of trl, simpo_repo; "):
        tokenize_pairs(normalise(in_memory(CHAT_ROWS[:1])), family_tokenizer("chatml"),
                       DataArgs(completion_layout="simpo"))
    with pytest.raises(PrefoptError, match="^completion_layout: 'simpo' is not one of"):  # text rows too
        tokenize_pairs(normalise(in_memory([{"prompt": "a", "chosen": " b", "rejected": " c"}])),
                       family_tokenizer("chatml"), DataArgs(completion_layout="simpo"))


def test_explain_names_the_layout_and_a_bad_one_is_refused_when_the_config_is_built(tmp_path):
    from prefopt.config import build_config
    from prefopt.errors import PrefoptError
    from prefopt.explanation import explain

    base = {"method": "simpo", "output_dir": str(tmp_path / "o")}
    trl = [line for line in explain(build_config(base)).splitlines() if line.lstrip().startswith("completion")]
    assert trl == ["  completion         trl: TRL's: the prompt rendered with the generation prompt (the assistant header "
                   "is the prompt's); each completion is the text its answer adds to the conversation"]
    repo = explain(build_config({**base, "completion_layout": "simpo_repo"}))
    assert "simpo_repo: the SimPO repository's run_simpo.py" in repo
    assert "; an empty system turn opens prompts without one" in repo
    assert "an empty system turn" not in explain(build_config({**base, "completion_layout": "simpo_repo",
                                                               "auto_insert_empty_system_msg": False}))
    with pytest.raises(PrefoptError, match="completion_layout must be trl or simpo_repo, got 'simpo'"):
        build_config({**base, "completion_layout": "simpo"})
