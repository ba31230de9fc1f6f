"""Prototype: do on-policy pairs (the SimPO recipe) beat the demo's fixed pairs for the same steps?

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/onpolicy_proto.py OUT_DIR \
        [--seeds 0 1] [--start 300] [--steps 600] [--rounds 2] [--n 8] [--prompts 512] [--scorer exact]

Protocol (one seed):
  start   the demo's base model trained `--start` steps on the demo's fixed pairs (short of
          convergence: it answers some held-out prompts right, some wrong)
  arm A   from start, `--rounds` runs of steps/rounds each on the fixed pairs
  arm B   from start, `--rounds` runs of steps/rounds each on on-policy pairs: `--n` answers per
          training prompt sampled from the current model (temperature 0.8, top_p 0.95), scored,
          chosen = best, rejected = worst, prompts whose scores all tie dropped
Both arms: the demo's config (cpo_simpo, lr 3e-3 cosine, batch 32), the same run lengths, so the
same lr schedule. Reported: greedy exact-sort accuracy on the demo's 256 held-out prompts.

A prototype: the real sampling/scoring command is `prefopt pairs`; this script only measures.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from prefopt.demo import DEMO_CONFIG, _held_out, is_correct, make_rows, task_corpus


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def score(prompt: str, answer: str, scorer: str) -> float:
    """exact: 1 right, 0 wrong. graded: 1 right, else minus the token edit distance to the sorted answer."""
    if is_correct(prompt, answer):
        return 1.0
    if scorer == "exact":
        return 0.0
    want = sorted(prompt.split(":", 1)[1].split())
    return -float(edit_distance(answer.split(), want))


class Sampler:
    """A saved model answering chat prompts in batches (left padding, stops at <|im_end|> or EOS)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ids = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}
        self.eos = sorted(i for i in ids if i is not None)

    def answer(self, prompts: list[str], n: int = 1, sample: bool = False, batch: int = 256) -> list[list[str]]:
        out = []
        texts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
        for s in range(0, len(texts), batch):
            enc = self.tok(texts[s:s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": n} if sample else \
                {"do_sample": False}
            with torch.no_grad():
                seqs = self.model.generate(**enc, max_new_tokens=16, eos_token_id=self.eos,
                                           pad_token_id=self.tok.pad_token_id, **kw)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            decoded = []
            for row in new:
                stop = next((k for k, t in enumerate(row) if t in self.eos), len(row))
                decoded.append(self.tok.decode(row[:stop], skip_special_tokens=True).strip())
            out += [decoded[k * n:(k + 1) * n] for k in range(len(decoded) // n)]
        return out


def greedy_accuracy(model_dir: Path, prompts: list[str]) -> float:
    answers = Sampler(model_dir).answer(prompts)
    return sum(is_correct(p, a[0]) for p, a in zip(prompts, answers)) / len(prompts)


def onpolicy_rows(model_dir: Path, prompts: list[str], n: int, scorer: str, seed: int) -> tuple[list[dict], dict]:
    torch.manual_seed(seed)
    samples = Sampler(model_dir).answer(prompts, n=n, sample=True)
    rows, ties, right = [], 0, 0
    for p, answers in zip(prompts, samples):
        scores = [score(p, a, scorer) for a in answers]
        right += sum(s == 1.0 for s in scores)
        hi, lo = max(range(n), key=scores.__getitem__), min(range(n), key=scores.__getitem__)
        if scores[hi] == scores[lo]:
            ties += 1
            continue
        rows.append({"prompt": [{"role": "user", "content": p}],
                     "chosen": [{"role": "assistant", "content": answers[hi]}],
                     "rejected": [{"role": "assistant", "content": answers[lo]}]})
    return rows, {"pairs": len(rows), "tied_prompts": ties, "sample_accuracy": right / (n * len(prompts))}


def write_data(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def train(init: Path, data: Path, out: Path, steps: int, seed: int, lr: float | None = None) -> Path:
    import prefopt

    cfg = {**DEMO_CONFIG, "max_steps": steps, "learning_rate": lr or DEMO_CONFIG["learning_rate"], "eval_strategy": "no", "eval_on_start": False, "seed": seed,
           "logging_steps": max(steps // 4, 1), "model_name_or_path": str(init), "output_dir": str(out),
           "dataset_mixer": {str(data): 1.0}, "dataset_splits": ["train"], "report_to": "none"}
    prefopt.train(cfg)
    return out


def one_seed(out: Path, seed: int, a: argparse.Namespace) -> dict:
    from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

    t0 = time.time()
    fixed_rows = make_rows(6000, seed=1, chat=True)
    train_prompts = [r["prompt"][0]["content"] for r in fixed_rows]
    held = [r["prompt"][0]["content"] for r in _held_out(256, set(train_prompts), seed=2)]
    fixed = write_data(out / "fixed", fixed_rows)
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    base = save_tiny(tiny_model("llama", tok, seed=seed), tok, out / "base")
    start = train(base, fixed, out / "start", a.start, seed)
    res = {"seed": seed, "start_acc": greedy_accuracy(start, held), "rounds": []}
    per = a.steps // a.rounds
    model_a = model_b = start
    rng = random.Random(seed)
    for r in range(a.rounds):
        model_a = train(model_a, fixed, out / f"A{r}{a.tag}", per, seed + r, a.lr)
        prompts = rng.sample(train_prompts, a.prompts)
        rows, info = onpolicy_rows(model_b, prompts, a.n, a.scorer, seed * 100 + r)
        model_b = train(model_b, write_data(out / f"pairs{r}{a.tag}", rows), out / f"B{r}{a.tag}", per, seed + r, a.lr)
        info.update(A_acc=greedy_accuracy(model_a, held), B_acc=greedy_accuracy(model_b, held))
        res["rounds"].append(info)
        print(f"seed {seed} round {r}: {info}", flush=True)
    res["seconds"] = time.time() - t0
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--start", type=int, default=300)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="continuation runs' peak lr (default: the demo's)")
    p.add_argument("--tag", default="", help="suffix of the arms' folders: reruns into OUT_DIR reuse its start model")
    p.add_argument("--scorer", choices=["exact", "graded"], default="exact")
    a = p.parse_args()
    results = []
    for seed in a.seeds:
        r = one_seed(a.out / f"seed{seed}", seed, a)
        print(f"seed {seed}: start {r['start_acc']:.3f} -> A {r['rounds'][-1]['A_acc']:.3f}  "
              f"B {r['rounds'][-1]['B_acc']:.3f}  ({r['seconds']:.0f}s)", flush=True)
        results.append(r)
    (a.out / f"results{a.tag}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                     "results": results}, indent=1))


if __name__ == "__main__":
    main()
