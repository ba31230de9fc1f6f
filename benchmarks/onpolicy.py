"""On-policy pairs (`prefopt pairs` + demo.sort_reward) vs the demo's fixed pairs, same steps.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/onpolicy.py OUT_DIR \
        [--seed 0] [--start 600] [--rounds 2] [--steps 200] [--lr 1e-3] [--n 8] [--temperature 1.0] [--prompts 3000]

Protocol (one seed, one start strength):
  start  the demo's base model (tiny llama, tiny_model(seed=SEED)) trained --start steps on the
         demo's 6000 fixed pairs with DEMO_CONFIG (short of convergence: some answers right)
  arm A  from start, --rounds runs of --steps each on the fixed pairs
  arm B  from start, --rounds runs of --steps each; before each, `prefopt.pairs` samples --n answers
         per prompt from the current model on --prompts fresh prompts (never the held-out
         ones, not the fixed pairs' prompts, never reused across rounds), scored by prefopt.demo:sort_reward with
         min_chosen_score 1: chosen is a correct answer, rejected the model's own worst answer
Both arms: DEMO_CONFIG (cpo_simpo, cosine, 5% warmup, batch 32) at peak lr --lr, the same run
lengths, so the same schedule and objective. Measured: greedy exact-sort accuracy on the demo's
256 held-out prompts. Results: OUT_DIR/result.json and one printed line per round.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prefopt
from prefopt.demo import DEMO_CONFIG, _held_out, is_correct, make_rows, task_corpus


def greedy_accuracy(model_dir: Path, prompts: list[str], batch: int = 256) -> float:
    """Share of `prompts` whose greedy answer (16 new tokens, stop at <|im_end|>/EOS) is sorted right.

    The prompt is rendered as training and `prefopt pairs` render it: the chat template, then BOS
    first. (Without the BOS, as `tok.apply_chat_template` alone gives it, the same start model
    answers 19% instead of ~85% right: the prototype measured that mismatch.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.sampling import render_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stops = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if i is not None})
    right = 0
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        ids = [render_prompt(tok, [{"role": "user", "content": p}], "eval") for p in chunk]
        enc = tok.pad({"input_ids": ids}, return_tensors="pt")
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                                  pad_token_id=tok.pad_token_id)
        for p, row in zip(chunk, seqs[:, enc["input_ids"].shape[1]:].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            right += is_correct(p, tok.decode(row[:cut], skip_special_tokens=True).strip())
    return right / len(prompts)


def train(init: Path, data: Path, out: Path, steps: int, seed: int, lr: float) -> Path:
    """One DEMO_CONFIG run of `steps` from `init` on the pairs in `data` (a folder or a .jsonl file)."""
    cfg = {**DEMO_CONFIG, "max_steps": steps, "learning_rate": lr, "eval_strategy": "no", "eval_on_start": False,
           "seed": seed, "logging_steps": max(steps // 4, 1), "model_name_or_path": str(init),
           "output_dir": str(out), "datasets": [{"path": str(data)}], "report_to": "none"}
    prefopt.train(cfg)
    return out


def onpolicy_pairs(policy: Path, prompts: list[str], out: Path, a: argparse.Namespace, seed: int) -> dict:
    """`prefopt.pairs` on `prompts` from `policy`, scored by demo.sort_reward; returns its report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    made = prefopt.pairs({
        "model_name_or_path": str(policy), "datasets": [{"path": str(out / "prompts.jsonl")}],
        "reward_function": "prefopt.demo:sort_reward", "num_samples": a.n, "temperature": a.temperature,
        "top_p": 1.0, "max_new_tokens": 16, "selection": "best_worst", "min_chosen_score": 1.0,
        "generation_batch_size": 256, "output": str(out / "pairs.jsonl"), "seed": seed, "output_dir": str(out)})
    return made.report | {"file": str(made.output)}


def run(a: argparse.Namespace) -> dict:
    from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

    t0, out = time.time(), a.out
    fixed_rows = make_rows(6000, seed=1, chat=True)
    train_prompts = [r["prompt"][0]["content"] for r in fixed_rows]
    held = [r["prompt"][0]["content"] for r in _held_out(256, set(train_prompts), seed=2)]
    # B's prompts: fresh ones, neither in the fixed pairs (which start has memorised: sampling on them
    # mostly gives 8 identical right answers) nor held out
    seen = set(train_prompts) | set(held)
    fresh = list(dict.fromkeys(p for p in (r["prompt"][0]["content"] for r in make_rows(4 * a.rounds * a.prompts, seed=3,
                                                                                          chat=True)) if p not in seen))
    (out / "fixed").mkdir(parents=True, exist_ok=True)
    (out / "fixed" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed_rows))
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    base = save_tiny(tiny_model("llama", tok, seed=a.seed), tok, out / "base")
    start = out / "start"
    if not (start / "config.json").exists():  # a rerun into OUT_DIR reuses its start model
        train(base, out / "fixed", start, a.start, a.seed, DEMO_CONFIG["learning_rate"])
    res = {"args": {k: str(v) for k, v in vars(a).items()}, "start_acc": greedy_accuracy(start, held), "rounds": []}
    print(f"seed {a.seed} start {a.start}: acc {res['start_acc']:.3f}", flush=True)
    model_a = model_b = start
    for r in range(a.rounds):
        model_a = train(model_a, out / "fixed", out / f"A{r + 1}", a.steps, a.seed + r, a.lr)
        t1 = time.time()
        prompts = fresh[r * a.prompts:(r + 1) * a.prompts]  # never reused across rounds
        rep = onpolicy_pairs(model_b, prompts, out / f"pairs{r + 1}", a, 1000 * a.seed + 100 * r)
        t_pairs = time.time() - t1
        model_b = train(model_b, Path(rep["file"]), out / f"B{r + 1}", a.steps, a.seed + r, a.lr)
        info = {"A_acc": greedy_accuracy(model_a, held), "B_acc": greedy_accuracy(model_b, held),
                "pairs": rep["pairs"], "prompts": len(prompts), "dropped": {k: v for k, v in rep["dropped"].items() if v},
                "pairs_seconds": round(t_pairs, 1),
                "sample_mean_reward": rep["scores"]["all"]["mean"]}
        res["rounds"].append(info)
        print(f"seed {a.seed} start {a.start} round {r + 1}: {json.dumps(info)}", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    last = res["rounds"][-1]
    print(f"seed {a.seed} start {a.start}: before {res['start_acc']:.3f}  A {last['A_acc']:.3f}  "
          f"B {last['B_acc']:.3f}  ({res['seconds']:.0f}s)", flush=True)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3, help="the arms' peak lr (restarting at the demo's 3e-3 hurts both)")
    p.add_argument("--n", type=int, default=8, help="answers sampled per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=3000, help="fresh prompts per round")
    run(p.parse_args())


if __name__ == "__main__":
    main()
