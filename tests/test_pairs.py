"""`prefopt pairs`: the policy's sampled answers, scored, as a pairs file `prefopt train` reads.

A tiny random Llama answers the demo's sort prompts with a few digits and words; the scorer
below grades them (1 for a correct sort, else minus the positions that differ from it), so the
answers of one prompt score differently and pairs are made.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt.errors import PrefoptError

SCORER = '''
import re

def sort_score(prompt, answer, row):
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    digits = re.findall(r"\\d", text.split("Sort:")[1])
    want, got = sorted(digits), answer.split()
    return float(sum(a == b for a, b in zip(want, got)) - abs(len(want) - len(got)))

def raises(prompt, answer, row):
    raise ValueError("no grader for this one")

def text(prompt, answer, row):
    return "high"
'''


@pytest.fixture
def ws(workspace, tmp_path, monkeypatch):
    """A workspace with prompt-only files (chat and text), the scorer module in the cwd."""
    w = workspace("pairs", {"train": (6, 0)}, chat=True)
    from prefopt.demo import make_rows

    data = tmp_path / "prompts"
    data.mkdir()
    chat = [{"prompt": r["prompt"], "id": i} for i, r in enumerate(make_rows(10, 3, chat=True))]
    text = [{"prompt": r["prompt"]} for r in make_rows(10, 3)]
    (data / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (data / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    (tmp_path / "scorers.py").write_text(SCORER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return w, data


def config(w, data, name="chat.jsonl", **extra):
    return {"model_name_or_path": str(w.model), "datasets": [{"path": str(data / name)}],
            "reward_function": "scorers:sort_score", "num_samples": 4, "max_new_tokens": 8,
            "generation_batch_size": 4, "output": str(data.parent / "out" / "pairs.jsonl"), "temperature": 1.5,
            **extra}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pairs_are_the_best_and_worst_answers_and_train_reads_them(ws):
    import prefopt

    w, data = ws
    made = prefopt.pairs(config(w, data))
    rows = rows_of(made.output)
    report = made.report
    assert report["prompts"] == 10 and report["answers"] == 40
    assert report["pairs"] == len(rows) > 0
    assert report["pairs"] + sum(report["dropped"].values()) == 10
    for r in rows:
        assert r["chosen_score"] == max(r["all_scores"]) and r["rejected_score"] == min(r["all_scores"])
        assert r["chosen_score"] > r["rejected_score"]
        assert r["chosen"][0]["role"] == "assistant" and isinstance(r["prompt"], list)
        assert r["seeds"] == [42, 43, 44, 45] and r["chosen_seed"] in r["seeds"]
    saved = json.loads(made.output.with_suffix(".report.json").read_text())
    assert saved["pairs"] == len(rows) and not (made.output.parent / "pairs.jsonl.parts").exists()
    lengths = report["lengths"]
    assert 0 <= lengths["length_baseline_accuracy"] <= 1
    # the file is training data as it stands
    run = prefopt.train({"model_name_or_path": str(w.model), "datasets": [{"path": str(made.output)}],
                         "method": "simpo", "max_steps": 1, "per_device_train_batch_size": 2,
                         "output_dir": str(data.parent / "trained"), "save_strategy": "no"})
    assert run.train_metrics


def test_text_prompts_give_text_answers(ws):
    import prefopt

    w, data = ws
    made = prefopt.pairs(config(w, data, "text.jsonl", selection="best_random", prompt_format="text"))
    for r in rows_of(made.output):
        assert isinstance(r["prompt"], str) and isinstance(r["chosen"], str) and isinstance(r["rejected"], str)
        assert r["chosen_score"] == max(r["all_scores"]) and r["rejected_score"] < r["chosen_score"]


def test_text_prompts_are_a_user_turn_where_the_policy_chats(ws):
    """prompt_format auto: the policy has a chat template, so a text prompt is asked as a user turn and
    the pairs are chat rows, which training renders with the same template (what was sampled is trained)."""
    import prefopt

    w, data = ws
    made = prefopt.pairs(config(w, data, "text.jsonl"))
    text = [json.loads(x)["prompt"] for x in (data / "text.jsonl").read_text().splitlines()]
    for r in rows_of(made.output):
        assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"] in text
        assert r["chosen"][0]["role"] == "assistant"
    import shutil

    bare = shutil.copytree(w.model, data.parent / "bare")  # the same policy without a chat template
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((bare / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(settings))
    elsewhere = str(data.parent / "bare_out" / "pairs.jsonl")
    with pytest.raises(PrefoptError, match=r"chat.jsonl\[train\] row 0: the prompt is chat messages"):
        prefopt.pairs(config(w, data, "chat.jsonl", model_name_or_path=str(bare), output=elsewhere))
    with pytest.raises(PrefoptError, match="prompt_format: chat, but the policy's tokenizer has no chat template"):
        prefopt.pairs(config(w, data, "text.jsonl", model_name_or_path=str(bare), output=elsewhere,
                             prompt_format="chat"))
    text_pairs = prefopt.pairs(config(w, data, "text.jsonl", model_name_or_path=str(bare), output=elsewhere))
    assert all(isinstance(r["prompt"], str) for r in rows_of(text_pairs.output))


def test_the_same_settings_give_the_same_file_and_a_rerun_does_nothing(ws):
    import prefopt

    w, data = ws
    first = prefopt.pairs(config(w, data))
    text = first.output.read_text()
    again = prefopt.pairs(config(w, data))
    assert again.finished_before and first.output.read_text() == text
    other = config(w, data, output=str(data.parent / "other" / "pairs.jsonl"))
    assert prefopt.pairs(other).output.read_text() == text  # the seeds decide, not the run
    with pytest.raises(PrefoptError, match="other settings"):
        prefopt.pairs(config(w, data, temperature=0.9))
    assert first.output.read_text() == text


def test_a_users_file_is_never_replaced(ws):
    import prefopt

    w, data = ws
    out = data.parent / "out" / "pairs.jsonl"
    out.parent.mkdir()
    out.write_text("mine\n")
    with pytest.raises(PrefoptError, match="is not a `prefopt pairs` file"):
        prefopt.pairs(config(w, data))
    assert out.read_text() == "mine\n"
    out.unlink()
    report = out.with_suffix(".report.json")
    report.write_text("my notes\n")  # a file of the user's where the report would go
    with pytest.raises(PrefoptError, match="report.json exists and was not written by `prefopt pairs`"):
        prefopt.pairs(config(w, data))
    assert report.read_text() == "my notes\n" and not out.exists()


def test_another_selection_is_made_from_the_kept_answers(ws, capsys):
    """selection, min_score_gap and min_chosen_score change the pairs, not the answers: a rerun makes
    the pairs again from output.answers.jsonl without sampling; a pairs file lost after its report
    was written is made again the same way."""
    import prefopt

    w, data = ws
    first = prefopt.pairs(config(w, data))
    answers = first.output.with_suffix(".answers.jsonl").read_text()
    assert len(answers.splitlines()) == 10
    capsys.readouterr()
    none = prefopt.pairs(config(w, data, min_score_gap=1000.0))
    assert "making the pairs again" in capsys.readouterr().out and none.report["pairs"] == 0
    assert first.output.with_suffix(".answers.jsonl").read_text() == answers
    best = max(s for x in answers.splitlines() for s in json.loads(x)["scores"])
    only = prefopt.pairs(config(w, data, min_chosen_score=best))
    assert all(r["chosen_score"] == best for r in rows_of(only.output)) and only.report["dropped"]["best_below_min"]
    again = prefopt.pairs(config(w, data))
    assert again.output.read_text() == first.output.read_text()
    first.output.unlink()  # as a kill between the report and the pairs file leaves it
    assert prefopt.pairs(config(w, data)).output.read_text() == again.output.read_text()


def test_the_policys_generation_config_does_not_change_the_sampling(ws, tmp_path):
    """The settings alone decide: a repetition_penalty in the policy's generation_config.json is not applied
    (the vLLM engine would not apply it either)."""
    import shutil

    import prefopt

    w, data = ws
    plain = prefopt.pairs(config(w, data, output=str(tmp_path / "a" / "pairs.jsonl")))
    odd = shutil.copytree(w.model, tmp_path / "odd")
    generation = json.loads((odd / "generation_config.json").read_text())
    (odd / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 50.0, "top_k": 2}))
    other = prefopt.pairs(config(w, data, model_name_or_path=str(odd), output=str(tmp_path / "b" / "pairs.jsonl")))
    assert rows_of(other.output) == rows_of(plain.output)


def test_an_answer_reads_as_it_follows_its_prompt():
    """A SentencePiece-style decoder drops a leading space when the answer is decoded alone; training
    joins prompt and answer text, so the answer keeps the space it has after its prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prefopt.sampling import answer_text

    vocab = {w: i for i, w in enumerate(["[UNK]", "▁Hello", "▁world,", "▁how", "▁are", "▁you"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert tok.decode([3, 4, 5]) == "how are you"  # alone: no leading space
    assert answer_text(tok, [1, 2], [3, 4, 5]) == " how are you"
    assert tok("Hello world," + answer_text(tok, [1, 2], [3, 4, 5]))["input_ids"] == [1, 2, 3, 4, 5]


def test_chat_prompts_are_asked_as_training_renders_them(ws):
    """auto_insert_empty_system_msg: the prompt sampled from opens with the empty system turn training
    puts before it; a role the template does not know is refused by row."""
    from prefopt.config import build_config
    from prefopt.sampling import render_prompt
    from prefopt.templates import rendering

    w, _ = ws
    cfg = build_config({"method": "simpo", "auto_insert_empty_system_msg": True})
    ids = render_prompt(w.tokenizer, [{"role": "user", "content": "Sort: 2 1"}], "row 0", rendering(w.tokenizer, cfg.data))
    assert w.tokenizer.decode(ids).startswith("<s><|im_start|>system\n<|im_end|>\n<|im_start|>user\nSort: 2 1")
    with pytest.raises(PrefoptError, match="row 0: column 'prompt', message 0 has the role 'wizard'"):
        render_prompt(w.tokenizer, [{"role": "wizard", "content": "x"}], "row 0", rendering(w.tokenizer, cfg.data))


def test_a_min_score_gap_drops_close_calls(ws):
    import prefopt

    w, data = ws
    made = prefopt.pairs(config(w, data, min_score_gap=1000.0))
    assert made.report["pairs"] == 0 and made.report["dropped"]["gap_below_min"] + made.report["dropped"][
        "all_tie"] + made.report["dropped"]["identical_answers"] == 10


@pytest.mark.parametrize("extra, message", [
    ({"reward_function": None}, "name one scorer"),
    ({"reward_model": "x"}, "both are set"),
    ({"selection": "best_of"}, "selection"),
    ({"engine": "vllm"}, "vllm cannot run here"),
    ({"output": "pairs.json"}, "must end in .jsonl"),
    ({"seeds": [1, 2, 3]}, "num_samples is 4 but seeds lists 3"),
    ({"reward_function": "scorers:raises"}, r"chat.jsonl\[train\] row 0.*ValueError: no grader"),
    ({"reward_function": "scorers:text"}, r"row 0.*'high'"),
])
def test_bad_settings_are_refused_before_anything_is_written(ws, extra, message):
    import prefopt

    w, data = ws
    if extra.get("engine") == "vllm":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("vLLM may run on this machine")
    with pytest.raises(PrefoptError, match=message):
        prefopt.pairs(config(w, data, **extra))
    assert not (data.parent / "out" / "pairs.jsonl").exists()


def test_prompt_problems_name_the_row(ws):
    import prefopt

    w, data = ws
    bad = data / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Sort: 1 2 ="}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(PrefoptError, match=r"bad.jsonl\[train\] row 1: the prompt is empty"):
        prefopt.pairs(config(w, data, "bad.jsonl"))
    (data / "nocol.jsonl").write_text(json.dumps({"question": "Sort: 1 2 ="}) + "\n")
    with pytest.raises(PrefoptError, match=r"no prompt column .*column_mapping: \{prompt: question\}"):
        prefopt.pairs(config(w, data, "nocol.jsonl"))
    made = prefopt.pairs(config(w, data, "nocol.jsonl", column_mapping={"prompt": "question"}))
    assert made.report["prompts"] == 1
    (data / "empty.jsonl").write_text("")
    with pytest.raises(PrefoptError):
        prefopt.pairs(config(w, data, "empty.jsonl"))


def _command(cfg: dict, path: Path) -> list[str]:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "prefopt", "pairs", str(path)]


def test_a_killed_run_resumes_and_ends_with_the_same_file(ws, tmp_path):
    """SIGKILL after some batches are written; the rerun makes only the missing ones."""
    import prefopt

    w, data = ws
    whole = prefopt.pairs(config(w, data, output=str(tmp_path / "whole" / "pairs.jsonl"), generation_batch_size=2))
    cfg = config(w, data, output=str(tmp_path / "killed" / "pairs.jsonl"), generation_batch_size=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(_command(cfg, tmp_path / "c.yaml"), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = tmp_path / "killed" / "pairs.jsonl.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("batch-*.jsonl"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in parts.glob("batch-*.jsonl"))
    assert 2 <= len(written) < 5, written  # stopped part-way
    done = subprocess.run(_command(cfg, tmp_path / "c.yaml"), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(written)} done before" in done.stdout
    assert (tmp_path / "killed" / "pairs.jsonl").read_text() == whole.output.read_text()
    assert not parts.exists()


def test_sigterm_stops_in_one_line_and_the_same_command_continues(ws, tmp_path):
    import prefopt

    w, data = ws
    cfg = config(w, data, output=str(tmp_path / "termed" / "pairs.jsonl"), generation_batch_size=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(_command(cfg, tmp_path / "c.yaml"), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "termed" / "pairs.jsonl.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.glob("batch-*.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM; the batches finished so far are kept" in err and "Traceback" not in err
    assert not (tmp_path / "termed" / "pairs.jsonl").exists()
    done = subprocess.run(_command(cfg, tmp_path / "c.yaml"), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = prefopt.pairs(config(w, data, output=str(tmp_path / "whole" / "pairs.jsonl"), generation_batch_size=2))
    assert (tmp_path / "termed" / "pairs.jsonl").read_text() == whole.output.read_text()


def test_two_processes_write_what_one_writes(ws, tmp_path):
    """torchrun with 2 processes: each takes every other batch; the merged file is one process's."""
    import prefopt
    from helpers import free_port

    w, data = ws
    one = prefopt.pairs(config(w, data, output=str(tmp_path / "one" / "pairs.jsonl"), generation_batch_size=3))
    cfg = config(w, data, output=str(tmp_path / "two" / "pairs.jsonl"), generation_batch_size=3)
    cmd = _command(cfg, tmp_path / "c.yaml")
    cmd[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "prefopt"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 process(es)" in done.stdout
    assert (tmp_path / "two" / "pairs.jsonl").read_text() == one.output.read_text()


def test_rounds_alternate_pairs_and_training_and_a_rerun_redoes_nothing(ws, tmp_path):
    import prefopt
    from prefopt.demo import make_rows

    w, data = ws
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in make_rows(4, 9, chat=True)))
    cfg = {**config(w, data), "output": None, "method": "simpo", "max_steps": 2, "per_device_train_batch_size": 2,
           "learning_rate": 0.01, "logging_steps": 1, "per_device_eval_batch_size": 4, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no",
           "output_dir": str(tmp_path / "rounds"),
           "datasets": [{"path": str(data / "chat.jsonl")}, {"path": str(held_out), "eval": True}]}
    summary = prefopt.iterate(cfg, rounds=2)
    root = tmp_path / "rounds"
    assert [e["round"] for e in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][1]["policy"] == summary["rounds"][0]["model"] == str(root / "round-1" / "model")
    assert summary["rounds"][2]["policy"] == str(root / "round-2" / "model") and "model" not in summary["rounds"][2]
    for e in summary["rounds"][:2]:
        assert e["pairs"] > 0 and "eval_rewards/accuracies" in e["eval"]
        assert e["train"]["train_loss"] > 0 and 0 <= e["train"]["rewards/accuracies"] <= 1
    # each round's policy answered differently: the model trained in the round before
    assert (root / "round-2" / "pairs.jsonl").read_text() != (root / "round-1" / "pairs.jsonl").read_text()
    assert json.loads((root / "iterate.json").read_text()) == summary
    stamp = (root / "round-2" / "model" / "model.safetensors").stat().st_mtime_ns
    assert prefopt.iterate(cfg, rounds=2) == summary
    assert (root / "round-2" / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_vllm_engine_asks_for_what_transformers_does_and_answers_in_the_same_form(monkeypatch):
    """No GPU here: a stand-in `vllm` module records the requests. Each prompt goes as its token ids,
    with the sampling settings, every EOS id as a stop id, and a seed of its own (seed, prompt index),
    so an answer does not depend on the batch it is in."""
    import types
    from dataclasses import dataclass as dc

    from prefopt.sampling import VllmEngine, derived_seed

    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    @dc
    class Out:
        token_ids: list
        finish_reason: str

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def generate(self, prompts, params, use_tqdm):
            seen["prompts"], seen["params"] = prompts, params
            return [types.SimpleNamespace(outputs=[Out([5, 6, 2], "stop")]), types.SimpleNamespace(outputs=[Out([7], "length")])]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))

    class Tok:
        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids))

    settings = types.SimpleNamespace(temperature=0.8, top_p=0.95, max_new_tokens=12, vllm_gpu_memory_utilization=0.6)
    engine = VllmEngine("policy", Tok(), settings, eos=[2], trust_remote_code=False, dtype=None)
    answers = engine.sample([[1, 3], [1, 4, 4]], seed=7, first_index=10)
    assert seen["prompts"] == [{"prompt_token_ids": [1, 3]}, {"prompt_token_ids": [1, 4, 4]}]
    p = seen["params"]
    assert [x.seed for x in p] == [derived_seed(7, 10) % 2**31, derived_seed(7, 11) % 2**31]
    assert (p[0].temperature, p[0].top_p, p[0].max_tokens, p[0].stop_token_ids) == (0.8, 0.95, 12, [2])
    # decoded after the prompt (the stand-in tokenizer joins ids with spaces), up to the EOS
    assert [(a.text, a.tokens, a.stopped) for a in answers] == [(" 5 6", 2, True), (" 7", 1, False)]
    assert seen["llm"]["gpu_memory_utilization"] == 0.6 and seen["llm"]["revision"] == "main"


def test_a_reward_model_trained_here_scores_the_answers_end_to_end(ws, tmp_path):
    """The reward-model path: a tiny Bradley-Terry model trained offline on demo pairs (its own
    tokenizer and chat template), the conversation rendered with its template, one score per answer."""
    import prefopt
    from prefopt.demo import make_rows
    from prefopt.rewards import RewardModel, ScoreItem
    from prefopt.tiny import train_reward_model

    w, data = ws
    judge = tmp_path / "judge"
    train_reward_model(make_rows(800, 5, chat=True), judge, steps=150)
    made = prefopt.pairs(config(w, data, reward_function=None, reward_model=str(judge)))
    rows = rows_of(made.output)
    assert rows and made.report["pairs"] == len(rows)
    first = rows[0]
    again = RewardModel(str(judge)).score([ScoreItem(first["prompt"], first["chosen"][0]["content"], {}, "x")])
    # the same text through the same model, once alone and once in a padded batch: float32 round-off only
    assert again[0] == pytest.approx(first["chosen_score"], abs=1e-4)
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
