"""The FLOP side of bench.py: the fewest FLOPs a training step can take, and this machine's fp32 matmul rate.

A run's FLOP fraction = minimum FLOPs of its timed steps / (their wall time × `calibrate()`'s GEMM rate):
the share of the machine's matmul limit that went into work the objective cannot do without. Padding,
a prompt computed twice, logits of positions no loss reads, and everything that is not a matmul
(softmax, norms, the optimizer, Python) lower it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def model_dims(model_path: str) -> dict:
    """The sizes `min_flops` needs, read from the fixture's config.json."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    heads, H = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or H // heads  # absent from configs that leave it to H / heads
    return {"H": H, "L": cfg["num_hidden_layers"], "I": cfg["intermediate_size"], "V": cfg["vocab_size"],
            "heads": heads, "kv": cfg["num_key_value_heads"] * head_dim, "attn": heads * head_dim}


def body_params(d: dict) -> int:
    """Non-embedding linear weights: q and o (H × heads·head_dim), k and v (H × kv heads·head_dim),
    gate, up and down (H × I), in each of the L layers. Norm weights do no matmul."""
    return d["L"] * (2 * d["H"] * d["attn"] + 2 * d["H"] * d["kv"] + 3 * d["H"] * d["I"])


def min_flops(P, C, R, d: dict, nll_over_prompt: bool):
    """Minimum FLOPs (forward + backward) of pairs with P prompt, C chosen and R rejected tokens after
    truncation (ints or arrays: per pair), the prompt computed once:

        6 · N · (P + C + R)                      linear layers, N = body_params(d), each unique token once
      + 3 · 4 · A_h · L · (P(P+1)/2 + (C + R)·P + C(C+1)/2 + R(R+1)/2)
                                                 causal attention: a prompt query sees the prompt up to itself,
                                                 a completion query the whole prompt and its own earlier tokens
      + 6 · H · V · S                            LM head on the scored positions only

    4 · A_h per (query, key) pair and layer is QKᵀ and PV, one multiply-add (2 FLOPs) per head dimension
    each (A_h = heads × head_dim); the factors 6 and 3: backward costs twice the forward (gradients of
    the input and of the weight). S = C + R: the positions whose log-probs the loss reads; ORPO's NLL
    (`nll_over_prompt`) also reads the prompt's tokens after the first, so S = P − 1 + C + R."""
    attended = P * (P + 1) / 2 + (C + R) * P + C * (C + 1) / 2 + R * (R + 1) / 2
    scored = C + R + (P - 1 if nll_over_prompt else 0)
    return (6.0 * body_params(d) * (P + C + R) + 12.0 * d["attn"] * d["L"] * attended
            + 6.0 * d["H"] * d["V"] * scored)


def _mm_rate(m: int, k: int, n: int, reps: int) -> float:
    """Best GFLOP/s of `reps` timed [m, k] @ [k, n] products into a preallocated output."""
    import torch

    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.mm(a, b, out=out)  # untimed: wakes the threads and touches the output's pages
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2.0 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def calibrate(vocab: int, hidden: int = 256) -> dict:
    """fp32 matmul GFLOP/s on this process's threads, right now (the VM shares its host, and a slower
    host shows up here rather than being blamed on a trainer):

    gemm: best of square 2048 and 4096 products, the sustained rate the FLOP fractions divide by;
    head: the LM head's own shape [1024, hidden] @ [hidden, vocab], whose short inner dimension runs
      below it.

    Outputs are preallocated. The probe before this one timed `a @ b` at [1024, 256] @ [256, 8192]:
    a fresh 32 MB product per call, whose page faults the kernel zeroes on one core while the GEMM
    waits, timed with every product (at 1 thread on this machine, shared: 64 GFLOP/s as it was,
    87 with `out=`, 83-89 here). The rate itself moves with the host the VM lands on: on 2026-12-03
    a quiet 2-thread fp32 GEMM here ran 158-185 GFLOP/s; an earlier session's host ran 345-377."""
    import torch

    gemm = max(_mm_rate(2048, 2048, 2048, 6), _mm_rate(4096, 4096, 4096, 2))
    return {"gemm": gemm, "head": _mm_rate(1024, hidden, vocab, 3), "threads": torch.get_num_threads(),
            "head_shape": f"[1024,{hidden}]x[{hidden},{vocab}]"}
