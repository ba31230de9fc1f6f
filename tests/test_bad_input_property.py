"""A property test of bad input: random rows and small configs either prepare and collate, or stop
with a PrefoptError, never another exception.
"""

import itertools

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bad_input_helpers import assistant, tokenizers, user, write_jsonl
from prefopt.collate import LAYOUTS, collator_for
from prefopt.config import build_config
from prefopt.data import prepare
from prefopt.errors import PrefoptError

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def toks():
    return tokenizers()


TEXTS = st.one_of(
    st.sampled_from(["Sort: 3 1 2 =", " 1 2 3", " 3 2 1", "é 🙂 中", "<|endoftext|>", "<s>", "<|im_end|>\n", "",
                     " ", "\n\t "]),
    st.text(min_size=1, max_size=20),
    st.text(alphabet="ab 9\n", min_size=200, max_size=800),
)
MESSAGES = st.one_of(*(st.builds(lambda t, role=role: {"role": role, "content": t}, TEXTS)
                       for role in ("user", "assistant", "system")))
PROMPTS = st.builds(lambda history, last: history + [user(last)], st.lists(MESSAGES, max_size=2), TEXTS)
REPLIES = st.builds(lambda t: [assistant(t)], TEXTS)
WELL_FORMED = {
    "text": st.fixed_dictionaries({"prompt": TEXTS, "chosen": TEXTS, "rejected": TEXTS}),
    "chat": st.fixed_dictionaries({"prompt": PROMPTS, "chosen": REPLIES, "rejected": REPLIES}),
    "implicit_chat": st.builds(lambda p, c, r: {"chosen": p + c, "rejected": p + r}, PROMPTS, REPLIES, REPLIES),
}
# anything at all: odd roles, missing or non-string fields, values of every JSON type, other keys
ODD_MESSAGES = st.one_of(
    MESSAGES,
    st.fixed_dictionaries({"role": st.sampled_from(["tool", "", "narrator"]), "content": TEXTS}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]),
                    st.one_of(TEXTS, st.none(), st.integers(), st.lists(TEXTS, max_size=2)), max_size=3),
)
CONVERSATIONS = st.lists(ODD_MESSAGES, max_size=4)
VALUES = st.one_of(TEXTS, CONVERSATIONS, st.none(), st.integers(), st.floats(), st.booleans(),
                   st.lists(TEXTS, max_size=2), st.dictionaries(st.text(max_size=3), TEXTS, max_size=2))
WILD = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "question", "good", "bad", "extra"]), VALUES,
                    max_size=5),
    st.fixed_dictionaries({"prompt": CONVERSATIONS, "chosen": CONVERSATIONS, "rejected": CONVERSATIONS}),
    st.fixed_dictionaries({"chosen": CONVERSATIONS, "rejected": CONVERSATIONS}),
)


@st.composite
def row_sets(draw) -> list[dict]:
    """Rows of one file: well-formed rows of one schema (with blank, special-token, unicode and long
    texts), a third of the time mixed with rows of anything at all."""
    good = WELL_FORMED[draw(st.sampled_from(list(WELL_FORMED)))]
    row = st.one_of(good, good, WILD) if draw(st.integers(0, 2)) == 0 else good
    return draw(st.lists(row, min_size=1, max_size=8))


# valid settings only: refusing bad ones is test_11_bad_configs' job
CONFIG_KEYS = st.fixed_dictionaries({
    "per_device_train_batch_size": st.sampled_from([1, 2]),
    "max_dropped_share": st.sampled_from([1.0, 1.0, 0.5]),
}, optional={
    "max_length": st.one_of(st.none(), st.integers(2, 96)),
    "max_prompt_length": st.one_of(st.none(), st.integers(1, 40)),
    "max_completion_length": st.one_of(st.none(), st.integers(1, 24)),
    "truncation_mode": st.sampled_from(["keep_end", "keep_start"]),
    "column_mapping": st.sampled_from([{"prompt": "question", "chosen": "good", "rejected": "bad"},
                                       {"chosen": "rejected", "rejected": "chosen"}, {"chosen": "good"}]),
    "test_split_size": st.sampled_from([0.25, 1]),
})
FILES = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=row_sets(), keys=CONFIG_KEYS, which=st.sampled_from(["chat", "plain", "pad_eos"]))
def test_any_rows_and_config_prepare_and_collate_or_raise_a_prefopt_error(toks, scratch, rows, keys, which):
    path = write_jsonl(scratch / f"{next(FILES)}.jsonl", rows)
    tokenizer = toks[which]
    try:
        cfg = build_config({"datasets": [{"path": path}], "method": "simpo", "output_dir": str(scratch / "out"),
                            **keys})
        prepared = prepare(cfg, tokenizer)
    except PrefoptError:
        event("refused")  # (pytest --hypothesis-show-statistics shows how often)
        return
    event("prepared")
    data = cfg.data
    for split in (s for s in (prepared.train, prepared.eval) if s is not None):
        features = [dict(r) for r in split]
        for f in features:
            completions = (f["chosen_ids"], f["rejected_ids"])
            assert all(completions) and completions[0] != completions[1]
            if data.max_prompt_length is not None:
                assert len(f["prompt_ids"]) <= data.max_prompt_length
            if data.max_completion_length is not None:
                assert max(map(len, completions)) <= data.max_completion_length
            if data.max_length is not None:
                assert len(f["prompt_ids"]) + max(map(len, completions)) <= data.max_length
        for layout in LAYOUTS:
            batch = collator_for(cfg, tokenizer.pad_token_id, layout)(features[:4])
            scored = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features[:4])
            assert int(batch["score_is_completion"].sum()) == len(batch["score_index"]) == scored
