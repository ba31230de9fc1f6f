"""`prefopt eval` and `prefopt generate` on tiny local models: preference metrics agree with the
trainer's own evaluation, the length baseline and generation metrics are hand-checked, answers
stop at every EOS id, AlpacaEval files and a reward-model win rate come out."""

import json
import math
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from prefopt.cli import main
from prefopt.config import build_config
from prefopt.demo import make_rows, task_corpus
from prefopt.errors import PrefoptError
from prefopt.evaluation import Generator, evaluate, generation_metrics, preference_metrics, read_prompts
from prefopt.pipeline import train
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    save_tiny(tiny_model("llama", tok, seed=0), tok, root / "base")
    (root / "data").mkdir()
    rows = make_rows(24, 0, chat=True)
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = make_rows(10, 7, chat=True)
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in held_out[:4]))
    result = train(build_config({
        "model_name_or_path": str(root / "base"), "dataset_mixer": {str(root / "data"): 1.0},
        "dataset_splits": ["train", "test"], "method": "simpo", "learning_rate": 3e-3, "max_steps": 6,
        "per_device_train_batch_size": 8, "save_strategy": "no", "report_to": "none",
        "output_dir": str(root / "trained")}), log=lambda *a: None)
    judge = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=1,
                                                       pad_token_id=tok.pad_token_id))
    save_tiny(judge, tok, root / "judge")
    return root, result, held_out


def test_preference_metrics_agree_with_the_trainers_evaluation(ws):
    root, result, held_out = ws
    objective = {"method": "simpo"}
    metrics = preference_metrics(str(root / "trained"), str(root / "data"), "test", objective)
    assert metrics["pairs"] == 10
    assert metrics["accuracy"] == pytest.approx(result.eval_metrics["eval_rewards/accuracies"])
    assert metrics["margin"]["mean"] == pytest.approx(result.eval_metrics["eval_rewards/margins"], rel=1e-5)
    assert metrics["logps_chosen"] == pytest.approx(result.eval_metrics["eval_logps/chosen"], rel=1e-5)
    assert metrics["length_chosen"] == pytest.approx(result.eval_metrics["eval_lengths/chosen"])
    assert metrics["margin"]["p10"] <= metrics["margin"]["p50"] <= metrics["margin"]["p90"]


def test_length_baseline_is_how_often_the_longer_answer_is_chosen(tmp_path, ws):
    root = ws[0]
    rows = [{"prompt": "Sort: 3 1 2 =", "chosen": " 1 2 3 4 5", "rejected": " 1 2"},  # longer chosen
            {"prompt": "Sort: 5 4 =", "chosen": " 4", "rejected": " 4 5 6"},  # shorter chosen
            {"prompt": "Sort: 9 8 =", "chosen": " 8 9", "rejected": " 9 8"}]  # a tie counts half
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted(p.name for p in (root / "base").iterdir())
    metrics = preference_metrics(str(root / "base"), str(tmp_path / "d.jsonl"), None, {"method": "simpo"})
    assert metrics["length_baseline_accuracy"] == pytest.approx(0.5)
    assert metrics["length_chosen"] > 0 and metrics["pairs"] == 3  # a single file is the held-out set
    assert sorted(p.name for p in (root / "base").iterdir()) == before  # nothing written beside the model
    with pytest.raises(PrefoptError, match=r"prefopt eval: .*d.jsonl has no split 'dev'; name the one to score "
                                           r"with --split"):
        preference_metrics(str(root / "base"), str(tmp_path / "d.jsonl"), "dev", {"method": "simpo"})


def test_generation_metrics_by_hand():
    m = generation_metrics(["a b a b a b", "a c", ""], [t.split() for t in ["a b a b a b", "a c", ""]])
    assert m["answers"] == 3 and m["empty_rate"] == pytest.approx(1 / 3)
    assert m["mean_length"] == pytest.approx((6 + 2 + 0) / 3) and m["max_length"] == 6
    # 3-grams of the first answer: aba bab aba bab -> 2 distinct of 4 -> repetition 0.5; others too short
    assert m["repetition_rate"] == pytest.approx(0.5)
    assert m["distinct_1"] == pytest.approx(3 / 8)  # a b c over 8 tokens
    assert m["distinct_2"] == pytest.approx(3 / 6)  # ab ba ac over 6 bigrams


def test_generation_stops_at_every_eos_id_the_generation_config_lists(ws, tmp_path):
    root = ws[0]
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    tok_dir = tmp_path / "m"
    model.generation_config.eos_token_id = [5, 7]
    save_tiny(model, __import__("transformers").AutoTokenizer.from_pretrained(root / "base"), tok_dir)
    gen = Generator(str(tok_dir), max_new_tokens=4)
    assert {5, 7, gen.tokenizer.eos_token_id} <= set(gen.eos)
    (answer,) = gen.answer([[{"role": "user", "content": "Sort: 2 1"}]], progress=False)
    assert isinstance(answer, str)


def test_eval_cli_side_by_side_with_alpaca_files_and_win_rate(ws, tmp_path, capsys):
    root, _, _ = ws
    args = ["eval", "--model", str(root / "base"), "--model", str(root / "trained"), "--data", str(root / "data"),
            "--prompts", str(root / "prompts.jsonl"), "--reward_model", str(root / "judge"), "--max_new_tokens", "6",
            "--alpaca_eval", str(tmp_path / "alpaca"), "--output", str(tmp_path / "report.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "preference accuracy" in printed and "distinct-2" in printed and "win rate over base" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["preference"]) == {"base", "trained"} and set(report["generation"]) == {"base", "trained"}
    assert report["objective"]["method"] == "simpo"  # from the trained model's prefopt_config.yaml
    assert 0.0 <= report["win_rate_over_base"]["trained"] <= 1.0
    assert 0 < report["generation"]["base"]["entropy"] <= math.log(300)  # nats, at most ln V
    rows = json.loads((tmp_path / "alpaca" / "trained.json").read_text())
    assert len(rows) == 4 and set(rows[0]) == {"instruction", "output", "generator"}
    assert rows[0]["instruction"] == read_prompts(str(root / "prompts.jsonl"))[0][-1]["content"]


def test_a_model_against_itself_wins_half(ws):
    root = ws[0]
    report = evaluate([str(root / "base"), str(root / "base")], prompts=str(root / "prompts.jsonl"),
                      reward_model=str(root / "judge"), max_new_tokens=4)
    assert report["win_rate_over_base"] == {"base #2": 0.5}


def test_generate_cli_prompts_and_interactive_chat(ws, tmp_path, capsys):
    root = ws[0]
    assert main(["generate", "--model", str(root / "trained"), "--prompt", "Sort: 3 1 2", "--max_new_tokens", "5",
                 "--output", str(tmp_path / "g.json")]) == 0
    assert "> Sort: 3 1 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.json").read_text())[0]["generator"] == "trained"
    chat = subprocess.run([sys.executable, "-m", "prefopt", "generate", "--model", str(root / "trained"),
                           "--max_new_tokens", "4"], input="Sort: 2 1\nSort: 4 3\n\n", capture_output=True,
                          text=True, timeout=120)
    assert chat.returncode == 0 and len(chat.stdout.strip().splitlines()) >= 1
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
