"""What `prefopt eval` prints and stores about its generations: answer lengths counted in generated
tokens (never above max_new_tokens, exact where a model stops early), the first prompts' answers
printed model by model within the terminal's width, every answer (and reward) in the JSON report;
a missing split recognised by its type, not its wording."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from prefopt import evaluation
from prefopt.cli import main
from prefopt.demo import task_corpus
from prefopt.errors import MissingSplit, PrefoptError
from prefopt.evalreport import LENGTH_UNIT, SHOWN_LINES, SHOWN_PROMPTS, generations_block
from prefopt.evaluation import Generator, evaluate
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

PROMPTS = ["Sort: 3 1 2", "Sort: 5 4", "Sort: 9 8 7", "Sort: 2 1", "Sort: 6 5 4"]


def _never_stops(tok, a: int, b: int):
    """A tiny model whose every next token is `a` or `b` (never an EOS): its final norm keeps one
    hidden dimension, whose sign picks between the only two non-zero rows of its head."""
    model = tiny_model("llama", tok, seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[a, 0], model.lm_head.weight[b, 0] = 100.0, -100.0
    return model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalreport")
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    # byte-level pieces that are no whole UTF-8 character: decoded, each is U+FFFD, which tokenizes as three
    broken = [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"][:2]
    assert len(broken) == 2
    save_tiny(_never_stops(tok, *broken), tok, root / "looping")
    save_tiny(tiny_model("llama", tok, seed=1), tok, root / "base")
    judge = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=1,
                                                       pad_token_id=tok.pad_token_id))
    save_tiny(judge, tok, root / "judge")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, tok


def test_answer_length_is_generated_tokens_never_above_max_new_tokens(ws):
    root, tok = ws
    report = evaluate([str(root / "looping")], prompts=str(root / "prompts.txt"), max_new_tokens=16)
    metrics = report["generation"]["looping"]
    assert [r["answer_tokens"]["looping"] for r in report["generations"]] == [16] * len(PROMPTS)  # never stops
    assert metrics["mean_length"] == 16 and metrics["max_length"] == 16
    assert report["length_unit"] == LENGTH_UNIT
    # the old measure, the decoded text tokenized again, counts past the bound on these answers
    retokenized = [len(tok(r["answers"]["looping"], add_special_tokens=False)["input_ids"])
                   for r in report["generations"]]
    assert min(retokenized) > 16


class _Scripted:
    """Stands in for the model: `generate` returns these generated ids after the prompt."""

    generation_config = SimpleNamespace(eos_token_id=None)

    def __init__(self, rows: list[list[int]], vocab: int):
        self.rows, self.vocab = rows, vocab

    def generate(self, input_ids, attention_mask, **kwargs):
        new = torch.tensor(self.rows)
        steps = new.shape[1]
        assert steps <= kwargs["max_new_tokens"]
        return SimpleNamespace(sequences=torch.cat([input_ids, new], 1),
                               logits=tuple(torch.zeros(len(self.rows), self.vocab) for _ in range(steps)))


def test_a_model_that_stops_early_gets_its_exact_count(ws):
    root, tok = ws
    gen = Generator(str(root / "base"), max_new_tokens=6)
    gen.eos = sorted({tok.eos_token_id, 7})  # a second EOS id, as a generation config may list
    eos, pad, a, b = tok.eos_token_id, tok.pad_token_id, 40, 41
    gen.model = _Scripted([[a, b, eos, pad, pad, pad],   # stops after 2
                           [a, a, b, b, a, b],           # never stops: all 6
                           [eos, pad, pad, pad, pad, pad],  # stops at once: 0
                           [a, b, a, 7, pad, pad]], len(tok))  # the other EOS id: 3
    answers = gen.answer([[{"role": "user", "content": p}] for p in PROMPTS[:4]], progress=False)
    assert [len(ids) for ids in gen.answer_ids] == [2, 6, 0, 3]
    assert gen.answer_ids[0] == [a, b] and answers[2] == ""
    metrics = evaluation.generation_metrics(answers, gen.answer_ids)
    assert metrics["mean_length"] == pytest.approx((2 + 6 + 0 + 3) / 4) and metrics["max_length"] == 6
    assert gen.entropy_count == 3 + 6 + 1 + 4  # entropy counts each answer's tokens and its stopping EOS


def test_eval_prints_the_first_answers_side_by_side_and_stores_them_all(ws, tmp_path, capsys, monkeypatch):
    root, _ = ws
    monkeypatch.setenv("COLUMNS", "90")
    assert main(["eval", "--model", str(root / "base"), "--model", str(root / "looping"), "--prompts",
                 str(root / "prompts.txt"), "--reward_model", str(root / "judge"), "--max_new_tokens", "8",
                 "--output", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    records = report["generations"]
    assert len(records) == len(PROMPTS) and [r["prompt"] for r in records] == PROMPTS
    assert records[0]["messages"] == [{"role": "user", "content": PROMPTS[0]}]
    for record in records:
        assert set(record["answers"]) == set(record["rewards"]) == set(record["answer_tokens"]) == {"base", "looping"}
        assert all(0 <= n <= 8 for n in record["answer_tokens"].values())
    for name in ("base", "looping"):  # the mean reward is the mean of the stored ones
        assert report["generation"][name]["mean_reward"] == pytest.approx(
            sum(r["rewards"][name] for r in records) / len(records))
    block = printed[printed.index(f"answers to the first {SHOWN_PROMPTS} of {len(PROMPTS)} prompts"):]
    assert all(f"[{i}] {PROMPTS[i - 1]}" in block for i in range(1, SHOWN_PROMPTS + 1))
    assert f"[{SHOWN_PROMPTS + 1}]" not in block
    for name in ("base", "looping"):
        labelled = [line for line in block.splitlines() if line.startswith(f"  {name} (reward ")]
        assert len(labelled) == SHOWN_PROMPTS  # each shown prompt: the model's answer, labelled once
        assert labelled[0].startswith(f"  {name} (reward {records[0]['rewards'][name]:.3g})")
        first = labelled[0].split("│ ", 1)[1]
        assert first.rstrip("…") in " ".join(records[0]["answers"][name].split()) or first == "(empty)"
    assert all(len(line) <= 90 for line in block.split("\nprefopt: report in")[0].splitlines())
    assert "mean answer length (generated tokens)" in printed and "mean reward" in printed


def test_the_block_wraps_to_the_width_and_cuts_long_answers():
    long = " ".join(f"word{i}" for i in range(200))
    records = [{"prompt": "Explain", "answers": {"a-model": long, "b": "", "c": "line one\nline two\x03"}}]
    block = generations_block(records, width=50)
    lines = block.splitlines()
    assert all(len(line) <= 50 for line in lines)
    a_lines = [line for line in lines if "│" in line][:SHOWN_LINES + 1]
    assert a_lines[0].startswith("  a-model │ word0 word1") and a_lines[SHOWN_LINES - 1].endswith("…")
    assert not a_lines[SHOWN_LINES].startswith("  a-model") and "word199" not in block
    assert "  b       │ (empty)" in lines and "  c       │ line one ⏎ line two·" in lines


def test_a_missing_split_is_caught_by_its_type(monkeypatch):
    found = MissingSplit("d.jsonl: no split 'dev' (splits found: train). Ask for one of those.", "d.jsonl",
                         "dev", ["train"])
    monkeypatch.setattr("prefopt.data.prepare", lambda cfg, tokenizer: (_ for _ in ()).throw(found))
    with pytest.raises(PrefoptError, match=r"prefopt eval: d.jsonl has no split 'dev'; name the one to score with "
                                           r"--split \(the message: d.jsonl: no split 'dev'") as e:
        evaluation._scored_pairs(None, None, "d.jsonl", "dev")
    assert not isinstance(e.value, MissingSplit)
    # the same words in another error are that error's, passed on as they are
    other = PrefoptError("d.jsonl: no split 'dev' in the column mapping")
    monkeypatch.setattr("prefopt.data.prepare", lambda cfg, tokenizer: (_ for _ in ()).throw(other))
    with pytest.raises(PrefoptError) as e:
        evaluation._scored_pairs(None, None, "d.jsonl", "dev")
    assert e.value is other


def test_sources_raise_the_typed_error_naming_what_it_found(tmp_path):
    from prefopt.config import DatasetSource
    from prefopt.sources import load_source

    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(MissingSplit) as e:
        load_source(DatasetSource(path=str(tmp_path), split="test"), None, train=False)
    assert (e.value.split, e.value.found) == ("test", ["train"])
    assert f"{tmp_path}: no split 'test' (splits found: train)" in str(e.value)
