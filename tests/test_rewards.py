"""Scorers for `prefopt pairs` (prefopt.rewards): a reward function's values and every refusal, a
reward model's checks (one output, remote code), batched scores equal to one-by-one scores, and a
tiny reward model trained with a Bradley-Terry loss ranking the demo's answers."""

import copy
import json
import math
import statistics

import numpy as np
import pytest
import torch
from transformers import LlamaForSequenceClassification

from prefopt.demo import is_correct, make_rows, task_corpus
from prefopt.errors import PrefoptError
from prefopt.rewards import RewardFunction, RewardModel, ScoreItem, load_scorer
from prefopt.tiny import save_tiny, tiny_config, train_reward_model, train_tokenizer

CHECKS = '''
import math
def exact(prompt, answer, row):
    return float(answer.strip() == row["answer"])
def as_bool(prompt, answer, row):
    return answer == "yes"
def np_value(prompt, answer, row):
    import numpy
    return numpy.float32(0.25)
def raises(prompt, answer, row):
    raise ValueError("cannot parse " + answer)
def text(prompt, answer, row):
    return "x"
def nothing(prompt, answer, row):
    return None
def nan(prompt, answer, row):
    return math.nan
def two_args(prompt, answer):
    return 1.0
NOT_A_FUNCTION = 3
'''


def item(answer="42", prompt="What is 6 x 7?", row=None, where="data.jsonl[train] row 3"):
    return ScoreItem(prompt, answer, row if row is not None else {"prompt": prompt, "answer": "42"}, where)


@pytest.fixture()
def checks(tmp_path):
    (tmp_path / "reward_checks.py").write_text(CHECKS)
    return tmp_path


# -- reward function ----------------------------------------------------------------------------

def test_function_scores_by_module_and_by_file(checks, monkeypatch):
    by_module = load_scorer(None, "reward_checks:exact", search_paths=[str(checks)])
    assert by_module.score([item("42"), item(" 42\n"), item("41")]) == [1.0, 1.0, 0.0]
    monkeypatch.chdir(checks)  # a relative file path is found from the cwd too
    assert RewardFunction("reward_checks.py:as_bool").score([item("yes"), item("no")]) == [1.0, 0.0]
    assert RewardFunction(f"{checks}/reward_checks.py:np_value").score([item()]) == [0.25]
    assert by_module.name == "function reward_checks:exact"


@pytest.mark.parametrize("fn, expected", [
    ("raises", "raised ValueError: cannot parse 41"),
    ("text", "returned 'x' (str), not a number"),
    ("nothing", "returned None (NoneType), not a number"),
    ("nan", "returned nan; return a finite number"),
])
def test_function_failures_name_the_row_and_what_happened(checks, fn, expected):
    scorer = RewardFunction(f"reward_checks:{fn}", search_paths=[str(checks)])
    with pytest.raises(PrefoptError) as e:
        scorer.score([item("41", where="data.jsonl[train] row 17")])
    assert str(e.value).startswith("data.jsonl[train] row 17: reward function reward_checks:" + fn)
    assert expected in str(e.value)


@pytest.mark.parametrize("spec, expected", [
    ("reward_checks", "is not `module:function`"),
    ("reward_checks:", "is not `module:function`"),
    ("no_such_reward_module:score", "no module named 'no_such_reward_module'"),
    ("missing/checks.py:score", "no file missing/checks.py"),
    ("reward_checks:absent", "has no `absent` (its functions: as_bool, exact"),
    ("reward_checks:NOT_A_FUNCTION", "is a int, not a function"),
    ("reward_checks:two_args", "cannot be called as fn(prompt, answer, row)"),
])
def test_bad_function_specs_are_refused_with_the_fix(checks, spec, expected):
    with pytest.raises(PrefoptError, match="reward_function: ") as e:
        RewardFunction(spec, search_paths=[str(checks)])
    assert expected in str(e.value) and spec.rstrip(":") in str(e.value)


def test_a_module_whose_own_import_fails_is_told_apart_from_a_missing_one(tmp_path):
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\ndef score(p, a, r):\n    return 1.0\n")
    message = "importing it raised ModuleNotFoundError.*no_such_dependency_xyz.*install"
    with pytest.raises(PrefoptError, match=message):
        RewardFunction("needs_dep:score", search_paths=[str(tmp_path)])


def test_exactly_one_scorer_must_be_set(checks):
    message = r"set one of `reward_model: PATH` .* or `reward_function: module:function`"
    for args in ((None, None), ("some/model", "reward_checks:exact")):
        with pytest.raises(PrefoptError, match=message):
            load_scorer(*args, search_paths=[str(checks)])


# -- reward model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(task_corpus(), vocab_size=300)


def judge(tok, path, num_labels=1, seed=0):
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_config("llama", len(tok), num_labels=num_labels,
                                                       pad_token_id=tok.pad_token_id))
    return save_tiny(model, tok, path), model


def test_a_head_of_two_labels_is_refused(tok, tmp_path):
    path, _ = judge(tok, tmp_path / "two", num_labels=2)
    with pytest.raises(PrefoptError, match="num_labels=2, not one reward per answer"):
        RewardModel(str(path), device="cpu")
    with pytest.raises(PrefoptError, match="no `score` either"):  # trusted code, but nothing to read
        RewardModel(str(path), trust_remote_code=True, device="cpu")


REMOTE = '''
from dataclasses import dataclass
import torch
from transformers import LlamaForSequenceClassification
from transformers.utils import ModelOutput

@dataclass
class ScoredOutput(ModelOutput):
    score: torch.FloatTensor = None
    logits: torch.FloatTensor = None

class ScoredLlama(LlamaForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return ScoredOutput(score=(out.logits[:, 1] - out.logits[:, 0])[:, None], logits=out.logits)
'''


def test_remote_code_is_refused_unless_trusted_and_then_read_from_output_score(tok, tmp_path):
    path, model = judge(tok, tmp_path / "remote", num_labels=2)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_scored.ScoredLlama"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_scored.py").write_text(REMOTE)
    with pytest.raises(PrefoptError, match=r"ships its own model code .*`reward_trust_remote_code: true`"):
        load_scorer(str(path), None, device="cpu")
    scorer = load_scorer(str(path), None, trust_remote_code=True, device="cpu")
    assert type(scorer.model).__name__ == "ScoredLlama"
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Sort: 2 1"},
                                       {"role": "assistant", "content": "1 2"}], tokenize=False))["input_ids"]
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids])).logits[0]
    [score] = scorer.score([item("1 2", [{"role": "user", "content": "Sort: 2 1"}])])
    assert score == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)  # output.score, not logits[:, 0]


def test_batched_scores_equal_one_by_one_and_long_texts_are_truncated(tok, tmp_path):
    path, _ = judge(tok, tmp_path / "judge")
    rows = make_rows(12, seed=3, chat=True)
    items = [item(r["chosen"][0]["content"] + " 9" * (i % 5), r["prompt"] if i % 2 else r["prompt"][0]["content"])
             for i, r in enumerate(rows)]  # lengths differ, so batches are padded; text and chat prompts
    one = RewardModel(str(path), batch_size=1, device="cpu").score(items)
    batched = RewardModel(str(path), batch_size=5, device="cpu").score(items)
    # Tolerance: the same float32 sums in another order (other shapes pick other matmul blocking).
    # Each of 2 layers sums <= 128 terms per output; a reordered sum of K terms moves by at most
    # ~K * 2^-24 of its terms' magnitude (~1e-5 for K = 128, activations O(1) after RMSNorm),
    # so a few such steps stay under 1e-4 of the score's scale; the measured largest difference is 6e-8.
    scale = max(1.0, max(abs(s) for s in one))
    assert batched == pytest.approx(one, abs=1e-4 * scale)
    assert len(set(one)) == len(one)  # distinct scores: a row's score is not another row's
    short_tok = copy.deepcopy(tok)
    short_tok.model_max_length = 24  # read from the saved tokenizer_config.json
    short_path, _ = judge(short_tok, tmp_path / "short")
    short = RewardModel(str(short_path), batch_size=4, device="cpu")
    assert short.max_length == 24
    short.score(items)
    text_lengths = [len(tok(tok.apply_chat_template(
        [{"role": "user", "content": i.prompt if isinstance(i.prompt, str) else i.prompt[0]["content"]},
         {"role": "assistant", "content": i.answer}], tokenize=False))["input_ids"]) for i in items]
    assert short.truncated == sum(n > 24 for n in text_lengths) > 0


def test_reward_model_without_pad_uses_eos_and_plain_text_without_template(tmp_path):
    plain = train_tokenizer(task_corpus(), vocab_size=300, pad=None, chat_template=None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config("llama", len(plain), num_labels=1))
    path = save_tiny(model, plain, tmp_path / "plain")
    scorer = RewardModel(str(path), batch_size=3, device="cpu")
    assert scorer.model.config.pad_token_id == plain.eos_token_id
    scores = scorer.score([item(" 1 2", "Sort: 2 1 ="), item(" 1 2 3", "Sort: 3 1 2 =")])
    with torch.no_grad():
        direct = model.eval()(input_ids=torch.tensor([plain("Sort: 2 1 = 1 2")["input_ids"]])).logits[0, 0]
    assert scores[0] == pytest.approx(float(direct), abs=1e-5)  # prompt + answer, concatenated


# -- a tiny trained reward model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train = make_rows(2000, seed=1, chat=True)
    seen = {r["prompt"][0]["content"] for r in train}
    held = [r for r in make_rows(400, seed=2, chat=True) if r["prompt"][0]["content"] not in seen][:128]
    path = tmp_path_factory.mktemp("rm") / "reward"
    model, tok = train_reward_model(train, path, seed=0)
    return path, held


def test_trained_reward_model_prefers_chosen_on_held_out_pairs(trained):
    path, held = trained
    assert len(held) == 128
    scorer = load_scorer(str(path), None, device="cpu", batch_size=16)
    chosen = scorer.score([item(r["chosen"][0]["content"], r["prompt"]) for r in held])
    rejected = scorer.score([item(r["rejected"][0]["content"], r["prompt"]) for r in held])
    accuracy = statistics.fmean(c > r for c, r in zip(chosen, rejected))
    # Chance is 0.5 (sd 0.044 on 128 pairs): 0.75 is > 5 sd above it. Measured 0.90 (seed 0, one thread);
    # at p = 0.9 the sampling sd on 128 pairs is 0.027, so 0.75 is also > 5 sd below what was measured.
    assert accuracy > 0.75
    assert all(math.isfinite(s) for s in chosen + rejected)


def test_reward_model_scores_correct_sorts_above_wrong_ones(trained):
    path, held = trained
    scorer = load_scorer(str(path), None, device="cpu")
    answers = [(r["prompt"], r[k][0]["content"]) for r in held[:64] for k in ("chosen", "rejected")]
    scores = scorer.score([item(a, p) for p, a in answers])
    right = [s for (p, a), s in zip(answers, scores) if is_correct(p[0]["content"], a)]
    wrong = [s for (p, a), s in zip(answers, scores) if not is_correct(p[0]["content"], a)]
    assert len(right) == 64 and len(wrong) == 64
    assert statistics.fmean(right) > statistics.fmean(wrong)


def test_numbers_of_numpy_and_torch_types_are_accepted_containers_are_not():
    from prefopt.rewards import as_number

    assert as_number(np.int64(3)) == 3.0 and as_number(np.bool_(True)) == 1.0 and as_number(True) == 1.0
    assert as_number(torch.tensor(0.5)) == 0.5 and as_number(np.array(2.0)) == 2.0
    assert as_number(torch.tensor([0.5])) is None and as_number([1.0]) is None and as_number("1") is None
    assert as_number(torch.tensor(1 + 2j)) is None
