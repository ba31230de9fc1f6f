"""Speed and memory of prefopt against TRL 1.16 and its peers on the same pairs, weights and order.

    make bench                                   # installs the peers' pinned packages, then runs this
    .venv/bin/python benchmarks/bench.py --quick # smoke run: 32k vocab, max_length 256, 1 timed step
    .venv/bin/python benchmarks/bench.py --vocab 32000 --steps 3
    .venv/bin/python benchmarks/bench.py --quick --no-sweep --trainers trl,liger,cce --threads 1 --busy-ok
                                                 # the peers only, on a shared machine (timings not a measurement)

Everything is offline and deterministic. Fixtures are built once under benchmarks/.cache/:

- a word-level tokenizer (tokens `<pad>` `<s>` `</s>` w0 w1 ..., one word = one token, exactly V
  tokens in all) for V = 32,000 and V = 128,256;
- a tiny Llama (hidden 256, 4 layers, 4 heads, 4 kv heads, intermediate 1024, vocab V, fp32,
  untied), saved with save_pretrained together with its tokenizer;
- preference pairs of random words (jsonl, plain-text prompt/chosen/rejected): prompt tokens
  log-normal (median ~120, long tail, clipped to [8, 1500]), chosen and rejected independently
  log-normal (median ~250, clipped to [4, 1500]); some pairs exceed max_length and are truncated.

Each measured run is its own subprocess (`bench.py --worker SPEC`, torch.set_num_threads(--threads, 2)):

- trl: trl.experimental.cpo.CPOTrainer (CPO-SimPO: loss_type simpo, cpo_alpha 0.05, beta 10,
  simpo_gamma 5.4) and trl.experimental.orpo.ORPOTrainer (beta 0.1);
- prefopt: prefopt.config.build_config({same keys}) + prefopt.pipeline.train (layout "packed");
- dropin, the TRL drop-in: prefopt.trl.CPOTrainer / ORPOTrainer, called exactly as TRL's above (the
  same config keys, model object, dataset and tokenizer; only the import differs; layout "packed");
- liger, cce: the peers a user would pick instead of plain TRL (benchmarks/peers.py): TRL's trainers
  with the LM head and loss handed to Liger-Kernel 0.8.5's chunked preference losses, or to
  cut-cross-entropy 25.1.1 (on CPU its impl "torch_compile": its own kernel needs a GPU), called as
  TRL's; `make bench` installs both under the torch pin.

All of them: max_length 1024, batch 4, fp32, no gradient checkpointing, use_cpu, lr 1e-6, seed 42.
Per run: pairs/s and tokens/s (tokens = unique tokens of the pairs: prompt once + chosen +
rejected after truncation, no padding) over the timed steps (the first steps are warm-up, where
the peers' torch.compile compiles); peak memory (ru_maxrss of the worker, read when training ends);
positions through the transformer body (a forward pre-hook on the body counting input_ids.numel())
against the unique-token lower bound; the FLOP fraction, the step's minimum FLOPs
(benchmarks/flops.py `min_flops`) over its time × the machine's fp32 GEMM rate (`flops.calibrate`,
probed before and after every run); a per-phase time split (collate, forward body, head+loss,
backward, optimizer); the first step's loss. The pairs each trainer collated are fingerprinted, so
"same pairs, same order" is checked, not assumed, and with it the first batch: a peer's first-step
loss must match TRL's to 1e-5 relative, so that it trains the same objective.

A prefopt-only sweep then measures peak memory minus the weights+optimizer baseline at
max_length 256/512/1024/2048 and both vocabularies, on "saturated" pairs whose chosen and
rejected both run past max_length, so every pair fills it.

Results: printed tables, benchmarks/results.json and benchmarks/results.md (--quick writes
results-quick.*).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import operator
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flops  # benchmarks/flops.py: this script's folder is on sys.path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
SEED = 42
DATA_SEED = 1234
MODEL_SEED = 0
BATCH = 4
MAX_LENGTH = 1024
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
DATA_WORDS = 31_997  # words drawn only from those in every benchmarked vocabulary (w0 .. w31996)
METHODS = {
    # name: (TRL trainer, keys given verbatim to both TRL's config and prefopt's build_config)
    "cpo_simpo": ("cpo", dict(loss_type="simpo", cpo_alpha=0.05, beta=10.0, simpo_gamma=5.4)),
    "orpo": ("orpo", dict(beta=0.1)),
}
METHOD_TITLES = {"cpo_simpo": "CPO-SimPO", "orpo": "ORPO"}
TARGETS = {  # vocab: (min pairs/s ratio, max peak-memory ratio); positions within 5% of the lower bound
    32_000: (2.5, 0.35),
    128_256: (4.0, 0.20),
}
POSITIONS_TARGET = 1.05
# dropin: prefopt.trl's CPOTrainer/ORPOTrainer, called as TRL's; liger, cce: TRL's with a peer's head (peers.py)
TRAINERS = ("trl", "prefopt", "dropin", "liger", "cce")
PEERS = ("liger", "cce")
PEER_PACKAGES = ("liger-kernel", "cut-cross-entropy", "triton")  # the Makefile's bench target pins them
THREADS = 2  # torch threads of every worker and of the machine-speed probe (--threads)
BUSY_OK = False  # --busy-ok: smoke runs on a shared machine neither wait for quiet nor measure again

ENV = {
    "HF_HOME": str(CACHE / "hf"),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
    # PyTorch's transparent-huge-page switch for CPU buffers of 2 MB and more: `import prefopt` sets it
    # (src/prefopt/__init__.py) and every worker imports prefopt; set here so TRL and the peers run
    # with it whatever they import, and the comparison is of the code, not of the page size
    "THP_MEM_ALLOC_ENABLE": "1",
}


# =============================================================================================
# Fixtures


def model_dir(vocab: int) -> Path:
    return CACHE / f"llama-h256-l4-v{vocab}"


def build_model_fixture(vocab: int) -> Path:
    """Word-level tokenizer with exactly `vocab` tokens + a tiny untied fp32 Llama, in one folder."""
    path = model_dir(vocab)
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_map = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab_map.update({f"w{i}": len(SPECIALS) + i for i in range(vocab - len(SPECIALS))})
    backend = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=1_000_000)
    assert len(tokenizer) == vocab, len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def _lognormal_lengths(rng, n: int, median: float, sigma: float, lo: int, hi: int):
    import numpy as np

    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(int)


def build_data_fixture(kind: str, n: int, max_length: int = MAX_LENGTH) -> Path:
    """Preference pairs of random words, as a jsonl of plain strings.

    kind "realistic": prompt tokens (BOS included) log-normal, median 120, sigma 1.0, clipped to
      [8, 1500]; chosen and rejected tokens (EOS included) independently log-normal, median 250,
      sigma 0.75, clipped to [4, 1500]. Pairs whose prompt alone fills `max_length` are left
      out: TRL keeps such a pair with an empty completion (a NaN loss) while prefopt drops it,
      which would put the two trainers on different pairs.
    kind "saturated": prompt as above but clipped to [8, 200]; chosen and rejected 2,100 tokens,
      so at every max_length up to 2048 both completions are truncated and every pair fills it.
    """
    import numpy as np

    suffix = f"-max{max_length}" if kind == "realistic" else ""
    path = CACHE / f"pairs-{kind}-n{n}-seed{DATA_SEED}{suffix}.jsonl"
    if path.is_file():
        return path
    rng = np.random.default_rng(DATA_SEED)
    rows, draws = [], 0
    while len(rows) < n:
        draws += 1
        if kind == "realistic":
            p = int(_lognormal_lengths(rng, 1, 120, 1.0, 8, 1500)[0])
            c, r = (int(x) for x in _lognormal_lengths(rng, 2, 250, 0.75, 4, 1500))
            if p >= max_length:
                continue
        elif kind == "saturated":
            p = int(_lognormal_lengths(rng, 1, 120, 1.0, 8, 200)[0])
            c = r = 2100
        else:
            raise ValueError(kind)

        def words(k):
            return " ".join(f"w{i}" for i in rng.integers(0, DATA_WORDS, k))

        # token counts include BOS (prompt) and EOS (completions), which the trainers add
        rows.append({"prompt": words(p - 1), "chosen": " " + words(c - 1), "rejected": " " + words(r - 1)})
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.rename(path)
    (path.with_suffix(".meta.json")).write_text(json.dumps({"rows": n, "draws": draws, "kind": kind}))
    return path


def read_lengths(path: Path, max_length: int):
    """Per pair: prompt, chosen and rejected tokens (exact: one word = one token; BOS and EOS counted),
    then chosen and rejected after TRL/prefopt truncation (the prompt is never cut: no prompt fills
    max_length)."""
    import numpy as np

    P, C, R = [], [], []
    with path.open() as fh:
        for line in fh:
            row = json.loads(line)
            P.append(len(row["prompt"].split()) + 1)
            C.append(len(row["chosen"].split()) + 1)
            R.append(len(row["rejected"].split()) + 1)
    P, C, R = map(np.array, (P, C, R))
    return P, C, R, np.minimum(C, max_length - P), np.minimum(R, max_length - P)


def min_gflop_per_pair(path: Path, max_length: int, folders: dict, methods: list[str]) -> dict:
    """flops.min_flops per pair of the data in GFLOP, mean over all of it: {vocab: {method: value}}."""
    P, _, _, Ct, Rt = read_lengths(path, max_length)
    return {str(v): {m: float(flops.min_flops(P, Ct, Rt, flops.model_dims(str(f)), m == "orpo").mean()) / 1e9
                     for m in methods} for v, f in folders.items()}


def data_stats(path: Path, max_length: int) -> dict:
    """Token lengths before and after TRL/prefopt truncation."""
    import numpy as np

    P, C, R, Ct, Rt = read_lengths(path, max_length)

    def pct(a):
        return {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)} | {"max": int(a.max())}

    return {
        "pairs": int(len(P)),
        "prompt": pct(P), "chosen": pct(C), "rejected": pct(R),
        "pairs_truncated_at_max_length": int(((P + C > max_length) | (P + R > max_length)).sum()),
        "unique_tokens_per_pair_after_truncation_mean": float((P + Ct + Rt).mean()),
    }


# =============================================================================================
# Worker: one training run, instrumented


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _cpu_ticks() -> tuple[float, float]:
    """(this process's user+system CPU seconds, the machine's stolen CPU seconds) so far."""
    t = os.times()
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    steal = int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    return t.user + t.system, steal


def _digest(ids) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]


class Recorder:
    """Wraps a trainer's collator: which pairs (token-id fingerprints) it saw, and how long it took."""

    def __init__(self, inner, probe, kind: str):
        self.inner, self.probe, self.kind = inner, probe, kind

    def _triple(self, f):
        if self.kind == "trl":
            prompt = list(f["prompt_input_ids"])
            P = len(prompt)
            chosen, rejected = list(f["chosen_input_ids"]), list(f["rejected_input_ids"])
            assert chosen[:P] == prompt and rejected[:P] == prompt
            return prompt, chosen[P:], rejected[P:]
        return list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])

    def __call__(self, features):
        t = time.perf_counter()
        out = self.inner(features)
        dt = time.perf_counter() - t
        triples = [self._triple(f) for f in features]
        self.probe.collates.append({
            "collate_s": dt,
            "pairs": len(features),
            "unique_tokens": sum(len(p) + len(c) + len(r) for p, c, r in triples),
            "lengths": [[len(p), len(c), len(r)] for p, c, r in triples],
            "fingerprints": ["-".join(_digest(x) for x in tr) for tr in triples],
            "rows": [f.get("row") for f in features] if self.kind == "prefopt" else None,
        })
        return out


def make_probe():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Step boundaries, phase marks, positions through the body, and memory."""

        def __init__(self):
            self.steps, self.collates = [], []
            self.cur: dict = {}
            self.positions = 0
            self.forward_calls = 0
            self.last_end = None
            self.maxrss_train_end = None
            self.rss_train_begin = None
            self.profile_step, self.prof, self.op_table = None, None, None

        def mark(self, name):
            self.cur.setdefault(name, time.perf_counter())

        def on_train_begin(self, args, state, control, **kw):
            self.last_end = time.perf_counter()
            self.rss_train_begin = _rss_kib()

        def on_step_begin(self, args, state, control, **kw):
            self.cur = {"t_begin": time.perf_counter(), "rss_begin_kib": _rss_kib(),
                        "maxrss_begin_kib": _maxrss_kib()}
            self.cur["cpu_begin_s"], self.cur["steal_begin_s"] = _cpu_ticks()
            self.positions = self.forward_calls = 0
            if self.profile_step == state.global_step + 1:
                import torch

                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   record_shapes=True, profile_memory=True)
                self.prof.__enter__()

        def on_optimizer_step(self, args, state, control, **kw):
            self.mark("opt_end")

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            c = self.cur
            cpu, steal = _cpu_ticks()
            c.update(cpu_s=cpu - c["cpu_begin_s"], steal_s=steal - c["steal_begin_s"])
            c.update(t_end=t, interval_s=t - self.last_end, begin_to_end_s=t - c["t_begin"],
                     positions=self.positions, forward_calls=self.forward_calls, maxrss_kib=_maxrss_kib())
            self.steps.append(c)
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.op_table = profile_tables(self.prof)
                self.prof = None
            self.last_end = time.perf_counter()  # the profiler's own teardown is not the next step's time

        def on_train_end(self, args, state, control, **kw):
            self.maxrss_train_end = _maxrss_kib()

    return Probe()


def profile_tables(prof) -> dict:
    """Top operators of one profiled step: by own CPU time and by memory they allocate."""
    events = prof.key_averages(group_by_input_shape=True)
    rows = []
    for e in events:
        rows.append({"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
                     "shape_list": [list(x) if isinstance(x, (list, tuple)) else x for x in e.input_shapes][:4],
                     "self_cpu_s": e.self_cpu_time_total / 1e6, "cpu_total_s": e.cpu_time_total / 1e6,
                     "self_cpu_mem_mb": e.self_cpu_memory_usage / 1e6})
    total = sum(r["self_cpu_s"] for r in rows)
    by_op: dict = {}
    for r in rows:
        agg = by_op.setdefault(r["op"], {"op": r["op"], "calls": 0, "self_cpu_s": 0.0, "self_cpu_mem_mb": 0.0})
        agg["calls"] += r["calls"]
        agg["self_cpu_s"] += r["self_cpu_s"]
        agg["self_cpu_mem_mb"] += r["self_cpu_mem_mb"]
    return {
        "total_self_cpu_s": total,
        "top_by_time": sorted(rows, key=lambda r: -r["self_cpu_s"])[:25],
        "top_ops_by_time": sorted(by_op.values(), key=lambda r: -r["self_cpu_s"])[:20],
        "top_by_memory": sorted(rows, key=lambda r: -r["self_cpu_mem_mb"])[:15],
    }


def matmul_flops(op: str, shapes) -> float | None:
    """2·m·k·n for aten::mm [[m, k], [k, n]] and aten::addmm_ [[m, n], [m, k], [k, n]]."""
    try:
        if op == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
        elif op in ("aten::addmm_", "aten::addmm"):
            (m, k), (_, n) = shapes[1], shapes[2]
        else:
            return None
        return 2.0 * m * k * n
    except (TypeError, ValueError, IndexError):
        return None


def instrument(trainer, probe, kind: str):
    """Hooks on the live trainer: positions, body/head split of forward and backward, memory, and
    each step's loss (the first one is checked against TRL's)."""
    body = trainer.model.get_decoder()  # on the body, not the causal LM: the peers call the body alone
    norm = body.norm  # the final norm: the body ends here, the LM head starts

    def pre(module, args, kwargs):
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        probe.positions += ids.numel()
        probe.forward_calls += 1
        probe.mark("model_start")

    def after_norm(module, args, out):
        probe.mark("norm_end")
        if torch_is_grad(out):
            out.register_hook(lambda g: probe.mark("grad_reaches_body"))

    body.register_forward_pre_hook(pre, with_kwargs=True)
    norm.register_forward_hook(after_norm)

    compute_loss, training_step = trainer.compute_loss, trainer.training_step

    def timed_compute_loss(*a, **k):
        probe.mark("loss_start")
        out = compute_loss(*a, **k)
        probe.mark("loss_end")
        probe.cur.setdefault("loss", float(out.detach()))  # the training step's loss, as the trainer returns it
        probe.cur.setdefault("rss_after_forward_kib", _rss_kib())
        probe.cur.setdefault("maxrss_after_forward_kib", _maxrss_kib())
        return out

    def timed_training_step(*a, **k):
        probe.mark("train_step_start")
        out = training_step(*a, **k)
        probe.mark("backward_end")
        probe.cur.setdefault("rss_after_backward_kib", _rss_kib())
        probe.cur.setdefault("maxrss_after_backward_kib", _maxrss_kib())
        return out

    trainer.compute_loss = timed_compute_loss
    trainer.training_step = timed_training_step
    trainer.data_collator = Recorder(trainer.data_collator, probe, kind)


def torch_is_grad(t) -> bool:
    return getattr(t, "requires_grad", False)


def training_keys(spec: dict, out_dir: str) -> dict:
    """TrainingArguments keys shared verbatim by the TRL config and prefopt's build_config."""
    return dict(
        output_dir=out_dir,
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch"],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-6,
        seed=SEED,
        max_steps=spec["total_steps"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_trl(spec: dict, probe, out_dir: str) -> dict:
    if METHODS[spec["method"]][0] == "cpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    trainer = _train_as_trl(Config, Trainer, spec, probe, out_dir, "trl")
    return {"attn_implementation": trainer.model.config._attn_implementation, "layout": "padded (TRL)"}


def run_dropin(spec: dict, probe, out_dir: str) -> dict:
    """prefopt's TRL drop-in, called as `run_trl` calls TRL: the import is the only difference."""
    if METHODS[spec["method"]][0] == "cpo":
        from prefopt.trl import CPOConfig as Config, CPOTrainer as Trainer
    else:
        from prefopt.trl import ORPOConfig as Config, ORPOTrainer as Trainer
    trainer = _train_as_trl(Config, Trainer, spec, probe, out_dir, "prefopt")
    pack = getattr(trainer.data_collator.inner, "pack", None)
    return {"attn_implementation": trainer.model.config._attn_implementation,
            "layout": "packed" if pack else ("shared" if pack is False else "padded"),
            "logprob_chunk_tokens": trainer.scorer(trainer.model_wrapped).chunk,
            "method_resolved": trainer.prefopt_config.objective.method}


def run_peer(spec: dict, probe, out_dir: str) -> dict:
    """TRL's trainer with a peer's LM head and loss (benchmarks/peers.py), called as `run_trl` calls TRL's."""
    import peers

    Config, Trainer = peers.TRAINERS[spec["trainer"], METHODS[spec["method"]][0]]
    trainer = _train_as_trl(Config, Trainer, spec, probe, out_dir, "trl")
    out = {"attn_implementation": trainer.model.config._attn_implementation, "layout": "padded (TRL)",
           "head": peers.HEADS[spec["trainer"]]}
    if spec["trainer"] == "cce":
        out["cce_kernel_on_cpu"] = peers.cce_kernel_on_cpu()
    return out


def _train_as_trl(Config, Trainer, spec: dict, probe, out_dir: str, kind: str):
    """A TRL-style trainer built and trained as TRL's documentation calls it; the trainer."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = Config(**training_keys(spec, out_dir), **METHODS[spec["method"]][1])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[probe])
    instrument(trainer, probe, kind)
    trainer.train()
    return trainer


def run_prefopt(spec: dict, probe, out_dir: str) -> dict:
    import prefopt.pipeline as pipeline
    from prefopt.config import build_config

    _, keys = METHODS[spec["method"]]
    raw = {**training_keys(spec, out_dir), **keys, "dataset_name": spec["data"], "model_name_or_path": spec["model"]}
    if spec["method"] == "orpo":
        raw["method"] = "orpo"
    raw.update(spec.get("extra_keys") or {})  # what-if runs: layout, pack_length, logprob_chunk_size
    seen = {}
    original = pipeline.build_trainer

    def build_trainer(cfg, model, tokenizer, prepared, log=print):
        trainer = original(cfg, model, tokenizer, prepared, log)
        trainer.add_callback(probe)
        instrument(trainer, probe, "prefopt")
        seen["collator"] = type(trainer.data_collator.inner).__name__
        seen["pack"] = getattr(trainer.data_collator.inner, "pack", None)
        seen["trainer"] = trainer
        seen["attn_implementation"] = model.config._attn_implementation
        return trainer

    pipeline.build_trainer = build_trainer
    cfg = build_config(raw, where="bench")
    pipeline.train(cfg)
    trainer = seen["trainer"]
    seen["chunk"] = trainer.scorer(trainer.model_wrapped).chunk  # chosen when training began
    report = json.loads((Path(out_dir) / "data_report.json").read_text())
    layout = "packed" if seen.get("pack") else ("shared" if seen.get("pack") is False else "padded")
    return {"attn_implementation": seen.get("attn_implementation"), "layout": layout,
            "logprob_chunk_tokens": seen.get("chunk"), "data_report": report["train"],
            "method_resolved": cfg.objective.method}


def run_baseline(spec: dict) -> dict:
    """Weights + gradients + AdamW states (the Trainer's optimizer class and kwargs), no activations,
    with the same libraries imported: what every run's peak memory contains before activations."""
    import torch
    import datasets  # noqa: F401
    import trl.experimental.cpo  # noqa: F401
    import trl.experimental.orpo  # noqa: F401
    import prefopt.pipeline  # noqa: F401
    import prefopt.trl  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    if set(spec["trainers"]) & set(PEERS):
        import peers  # noqa: F401 - Liger-Kernel, cut-cross-entropy and triton, as the peer runs import them

    rss_imports = _rss_kib()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rss_weights = _rss_kib()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, learning_rate=1e-6))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cls(params, **kwargs)
    for step in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    n = sum(p.numel() for p in params)
    return {"params": n, "analytic_bytes_weights_grads_adam": 16 * n, "rss_after_imports_kib": rss_imports,
            "rss_after_weights_kib": rss_weights, "rss_kib": _rss_kib(), "maxrss_kib": _maxrss_kib(),
            "optimizer": f"{cls.__module__}.{cls.__name__}({kwargs})"}


def worker(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    import prefopt

    result: dict = {"spec": spec, "torch_threads": torch.get_num_threads(), "prefopt_file": prefopt.__file__}
    t0 = time.perf_counter()
    vocab = flops.model_dims(spec["model"])["V"]
    result["calibration_start"] = flops.calibrate(vocab)
    # the probe's transient (up to 0.7 GB at 128k, the head-shaped product) must stay below the run's peak
    result["maxrss_after_calibration_kib"] = _maxrss_kib()
    if spec["trainer"] == "baseline":
        result.update(run_baseline(spec))
    else:
        probe = make_probe()
        probe.profile_step = spec.get("profile_step")
        with tempfile.TemporaryDirectory(dir=CACHE / "runs") as out_dir:
            run = {"trl": run_trl, "prefopt": run_prefopt, "dropin": run_dropin, "liger": run_peer,
                   "cce": run_peer}[spec["trainer"]]
            result.update(run(spec, probe, out_dir))
        result.update(steps=probe.steps, collates=probe.collates, maxrss_train_end_kib=probe.maxrss_train_end,
                      rss_train_begin_kib=probe.rss_train_begin, op_table=probe.op_table)
    result["maxrss_exit_kib"] = _maxrss_kib()
    result["calibration_end"] = flops.calibrate(vocab)
    result["worker_wall_s"] = time.perf_counter() - t0
    Path(spec["result_file"]).write_text(json.dumps(result))


# =============================================================================================
# Parent: orchestration


SNAPSHOT: Path | None = None  # set by snapshot_src(): the prefopt sources every worker imports


def snapshot_src() -> dict:
    """Freeze src/prefopt for the whole run: other people edit it while a 15-minute benchmark runs,
    and a run must measure one version. Workers import the copy (PYTHONPATH comes first)."""
    import shutil

    global SNAPSHOT
    files = sorted(p for p in (ROOT / "src" / "prefopt").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha1()
    for p in files:
        digest.update(str(p.relative_to(ROOT)).encode())
        digest.update(p.read_bytes())
    h = digest.hexdigest()[:12]
    SNAPSHOT = CACHE / "src-snapshots" / h
    if not (SNAPSHOT / "prefopt").is_dir():
        tmp = SNAPSHOT.with_name(h + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ROOT / "src" / "prefopt", tmp / "prefopt", ignore=shutil.ignore_patterns("__pycache__"))
        tmp.rename(SNAPSHOT)

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001 - no git is fine
            return None

    return {"src_sha1": h, "snapshot": str(SNAPSHOT.relative_to(ROOT)), "git_head": git("rev-parse", "HEAD"),
            "git_head_subject": (git("log", "-1", "--format=%s") or "")[:70],
            "src_uncommitted_changes": bool(git("status", "--porcelain", "--", "src"))}


RUN_DIR: Path | None = None  # this invocation's worker results and logs (set in main)


def hold_machine():
    """One benchmark at a time: two on 2 cores would time each other. Waits for the other one (the
    lock goes with its process, so a killed run never blocks the next) and returns the held file."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    fh = open(CACHE / "bench.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        print(f"another benchmark is running ({fh.read().strip() or 'unknown'}); waiting for it to finish, "
              "since two runs on 2 cores would time each other ...", flush=True)
        t = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        print(f"  waited {time.perf_counter() - t:.0f}s", flush=True)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}: {' '.join(sys.argv)} since {time.strftime('%H:%M:%S')}\n")
    fh.flush()
    return fh


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, steal included) since boot."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished workers."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def others_load(seconds: float = 3.0) -> float:
    """Cores' worth of CPU used by everything but this benchmark over the next `seconds`."""
    b0, o0, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (_busy_cpu_s() - b0) - (_own_cpu_s() - o0)) / (time.perf_counter() - t0)


def busiest_other() -> str:
    """The process (not ours) that used the most CPU in the last second, for messages."""
    def snapshot():
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                    out[d.name] = int(f[11]) + int(f[12])
                except (OSError, IndexError, ValueError):
                    pass
        return out

    a = snapshot()
    time.sleep(1)
    b = snapshot()
    pid = max(b, key=lambda p: b[p] - a.get(p, b[p]), default=None)
    if pid is None:
        return "?"
    try:
        cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid}: {cmd[:100]}"


QUIET_LOAD = 0.25  # cores used by other processes that we still call a quiet machine
MAX_QUIET_WAIT = 900


def wait_until_quiet() -> float:
    """Block (up to MAX_QUIET_WAIT seconds) until other processes leave both cores to us; returns the wait.
    With --busy-ok, no wait."""
    t = time.perf_counter()
    if BUSY_OK:
        return 0.0
    load = others_load()
    told = False
    while load > QUIET_LOAD and time.perf_counter() - t < MAX_QUIET_WAIT:
        if not told:
            print(f"\n  machine busy ({load:.2f} cores used by others, e.g. {busiest_other()}); waiting ...",
                  end="", flush=True)
            told = True
        time.sleep(15)
        load = others_load()
    return time.perf_counter() - t


def launch(spec: dict, label: str, timeout: int = 3600, attempts: int = 3) -> dict | None:
    """Run one worker on a quiet machine; if other processes took CPU during it, run it again."""
    for attempt in range(1, attempts + 1):
        waited = wait_until_quiet()
        b0, o0, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        result = _launch_once(spec, label, timeout)
        wall = time.perf_counter() - t0
        others = max(0.0, (_busy_cpu_s() - b0) - (_own_cpu_s() - o0)) / wall
        if result is None:
            return None
        result.update(others_load_cores=others, waited_for_quiet_s=waited, attempt=attempt)
        if others <= QUIET_LOAD or BUSY_OK:
            return result
        print(f"  (other processes used {others:.2f} cores during {label}: "
              f"{'measuring it again' if attempt < attempts else 'kept, flagged as contended'})")
    result["contended"] = True
    return result


def _launch_once(spec: dict, label: str, timeout: int) -> dict | None:
    run_dir = RUN_DIR or CACHE / "runs"
    (CACHE / "runs").mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    result_file = run_dir / f"{label}.json"
    log_file = run_dir / f"{label}.log"
    result_file.unlink(missing_ok=True)
    spec = {**spec, "result_file": str(result_file), "threads": THREADS}
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    env["PYTHONPATH"] = str(SNAPSHOT or ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    print(f"  running {label} ...", end="", flush=True)
    with log_file.open("w") as log:
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=str(ROOT))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    dt = time.perf_counter() - t
    if rc != 0 or not result_file.is_file():
        print(f" FAILED ({rc}) after {dt:.0f}s; log: {log_file.relative_to(ROOT)}")
        tail = log_file.read_text().splitlines()[-25:]
        print("    " + "\n    ".join(tail))
        return None
    print(f" {dt:.0f}s")
    result = json.loads(result_file.read_text())
    result["subprocess_wall_s"] = dt
    return result


def kib_to_gb(kib) -> float:
    return kib * 1024 / 1e9


def baseline_gb(base: dict) -> float:
    """Resident memory with weights, gradients and AdamW states allocated and libraries imported,
    no activations (measured after two optimizer steps, not the load-time transient peak)."""
    return kib_to_gb(base["rss_kib"])


def flop_summary(run: dict, timed: list[int], seconds: float) -> dict:
    """The timed steps' minimum FLOPs (flops.min_flops on the pairs each step collated, lengths after
    truncation) against the run's own GEMM rate (the better of its two probes)."""
    import numpy as np

    P, C, R = np.array([ln for i in timed for ln in run["collates"][i]["lengths"]]).T
    total = float(flops.min_flops(P, C, R, flops.model_dims(run["spec"]["model"]),
                                  nll_over_prompt=run["spec"]["method"] == "orpo").sum())
    rate = max(run["calibration_start"]["gemm"], run["calibration_end"]["gemm"])
    return {"min_gflop_per_step": total / len(timed) / 1e9, "gemm_gflops": rate,
            "flop_fraction": total / (seconds * rate * 1e9)}


def peak_where(run: dict, upto: int | None, peak_kib: int) -> str | None:
    """Where the peak of steps 1 .. upto was first reached."""
    if run["maxrss_after_calibration_kib"] >= peak_kib:
        return "the machine-speed probe, before training (peak memory not the run's)"
    for i, st in enumerate(run["steps"][: upto or len(run["steps"])]):
        for name, key in (("before the step", "maxrss_begin_kib"), ("forward", "maxrss_after_forward_kib"),
                          ("backward", "maxrss_after_backward_kib"), ("optimizer", "maxrss_kib")):
            if st.get(key, -1) >= peak_kib:
                return f"step {i + 1} {name}"
    return None


def summarise(run: dict, warmup: int, upto: int | None = None) -> dict:
    """Throughput, memory, positions and the per-phase time split over the timed steps
    (steps warmup+1 .. upto, 1-based; all of them when upto is None)."""
    steps = run["steps"]
    timed = list(range(warmup, min(len(steps), upto or len(steps))))
    if not timed:
        timed = [len(steps) - 1]
    batches = run["collates"]
    t = sum(steps[i]["interval_s"] for i in timed)
    pairs = sum(batches[i]["pairs"] for i in timed)
    tokens = sum(batches[i]["unique_tokens"] for i in timed)
    positions = sum(steps[i]["positions"] for i in timed)
    phases = {k: 0.0 for k in ("collate", "before_model", "body_forward", "head_and_loss_forward",
                               "head_and_loss_backward", "body_backward", "clip_and_optimizer", "other")}
    for i in timed:
        s, b = steps[i], batches[i]
        phases["collate"] += b["collate_s"]
        phases["before_model"] += s["model_start"] - s["loss_start"]
        phases["body_forward"] += s["norm_end"] - s["model_start"]
        phases["head_and_loss_forward"] += s["loss_end"] - s["norm_end"]
        phases["head_and_loss_backward"] += s["grad_reaches_body"] - s["loss_end"]
        phases["body_backward"] += s["backward_end"] - s["grad_reaches_body"]
        phases["clip_and_optimizer"] += s["opt_end"] - s["backward_end"]
    phases["other"] = t - sum(phases.values())
    peak_kib = run["maxrss_train_end_kib"] if upto is None or upto >= len(steps) else steps[upto - 1]["maxrss_kib"]
    return {
        **flop_summary(run, timed, t),
        "first_step_loss": steps[0]["loss"],
        "calibration_gflops": [run["calibration_start"]["gemm"], run["calibration_end"]["gemm"]],
        "calibration_head_gflops": [run["calibration_start"]["head"], run["calibration_end"]["head"]],
        "steal_s_per_step": sum(steps[i]["steal_s"] for i in timed) / len(timed),
        "cpu_s_per_step": sum(steps[i]["cpu_s"] for i in timed) / len(timed),
        "peak_reached_in": peak_where(run, upto, peak_kib),
        "timed_steps": len(timed),
        "timed_step_indices": [i + 1 for i in timed],
        "seconds": t,
        "seconds_per_step": t / len(timed),
        "pairs": pairs,
        "unique_tokens": tokens,
        "pairs_per_s": pairs / t,
        "tokens_per_s": tokens / t,
        "positions": positions,
        "positions_per_lower_bound": positions / tokens,
        "positions_per_step": [steps[i]["positions"] for i in timed],
        "forward_calls_per_step": [steps[i]["forward_calls"] for i in timed],
        "unique_tokens_per_step": [batches[i]["unique_tokens"] for i in timed],
        "peak_kib": peak_kib,
        "peak_gb": kib_to_gb(peak_kib),
        "rss_train_begin_gb": kib_to_gb(run["rss_train_begin_kib"]),
        "rss_after_forward_gb_max": max(kib_to_gb(steps[i].get("rss_after_forward_kib", 0)) for i in range(len(steps))),
        "phases_s_per_step": {k: v / len(timed) for k, v in phases.items()},
        "all_step_intervals_s": [s["interval_s"] for s in steps],
        "fingerprints": [fp for b in batches[: len(steps)] for fp in b["fingerprints"]],
    }


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


COLUMNS = {"trl": "TRL", "prefopt": "prefopt train", "dropin": "TRL drop-in (prefopt.trl)",
           "liger": "TRL + Liger chunked loss", "cce": "TRL + cut-cross-entropy"}
SHORT = {"trl": "TRL", "prefopt": "prefopt", "dropin": "drop-in", "liger": "Liger", "cce": "CCE"}
RATIOS = (("prefopt", "trl"), ("dropin", "trl"), ("dropin", "prefopt"), ("prefopt", "liger"), ("prefopt", "cce"))
LOSS_PARITY = 1e-5  # a peer trains TRL's objective: its first-step loss within this of TRL's, relative


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def loss_parity(results: dict, key: str) -> dict:
    """(first-step loss − TRL's) / |TRL's| of every other trainer on `key` ("cpo_simpo-v32000"): the
    same weights and the same first batch (the fingerprints say so), so a trainer of TRL's objective
    lands within rounding of it."""
    runs = {t: results["runs"].get(f"{t}-{key}") for t in TRAINERS}
    if runs["trl"] is None:
        return {}
    ref = runs["trl"]["summary"]["first_step_loss"]
    return {t: (r["summary"]["first_step_loss"] - ref) / abs(ref) for t, r in runs.items() if r and t != "trl"}


def _summaries(results: dict, vocab: int, method: str) -> dict:
    return {t: r["summary"] for t in TRAINERS if (r := results["runs"].get(f"{t}-{method}-v{vocab}"))}


def main_table(results: dict, vocab: int, method: str) -> tuple[list[str], list[dict]]:
    """A column per trainer that ran, then the ratios between them; the targets judge prefopt train
    against TRL, the loss check each peer against TRL."""
    S = _summaries(results, vocab, method)
    cols = list(S)
    ratios = [(a, b) for a, b in RATIOS if a in S and b in S]
    judged_here = "prefopt" in S and "trl" in S  # the targets are prefopt's against TRL
    min_speed, max_mem = TARGETS.get(vocab, (None, None)) if judged_here else (None, None)
    header = [COLUMNS[t] for t in cols] + [f"{SHORT[a]}/{SHORT[b]}" for a, b in ratios] + ["target", "met"]
    rows = ["| metric | " + " | ".join(header) + " |", "|---|" + "---:|" * (len(cols) + len(ratios)) + "---|---|"]

    def row(name, values, spec, with_ratios=True, target="", ok=None):
        cells = [fmt(values.get(t), spec) for t in cols]
        for a, b in ratios:
            r = _ratio(values.get(a), values.get(b)) if with_ratios else None
            cells.append("" if r is None else f"{r:.2f}×")
        met = "" if ok is None else ("yes" if ok else "**no**")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {target} | {met} |")

    def of(k):
        return {t: S[t][k] for t in cols}

    def judged(k, bound, compare):
        r = _ratio(of(k).get("prefopt"), of(k).get("trl"))
        return r, None if r is None or bound is None else compare(r, bound)

    sp, ok_speed = judged("pairs_per_s", min_speed, operator.ge)
    row("pairs/s", of("pairs_per_s"), ".3f", target=f"prefopt ≥{min_speed}× TRL" if min_speed else "", ok=ok_speed)
    row("tokens/s (unique tokens)", of("tokens_per_s"), ".0f")
    row("s/step", of("seconds_per_step"), ".2f")
    mem, ok_mem = judged("peak_gb", max_mem, operator.le)
    row("peak memory (GB, ru_maxrss)", of("peak_gb"), ".2f", target=f"prefopt ≤{max_mem}× TRL" if max_mem else "",
        ok=ok_mem)
    base = results["baseline"].get(str(vocab))
    if base:
        row("peak − weights/optimizer baseline (GB)", {t: S[t]["peak_gb"] - baseline_gb(base) for t in cols}, ".2f")
    pos = of("positions_per_lower_bound").get("prefopt")
    pos_ok = None if pos is None else pos <= POSITIONS_TARGET
    row("positions computed / lower bound", of("positions_per_lower_bound"), ".3f",
        target=f"prefopt ≤{POSITIONS_TARGET}" if pos is not None else "", ok=pos_ok)
    row("minimum GFLOP per step", of("min_gflop_per_step"), ".1f", with_ratios=False)
    row("FLOP fraction (minimum FLOPs / (time × GEMM rate))", of("flop_fraction"), ".1%")
    row("first-step loss", of("first_step_loss"), ".6f", with_ratios=False)
    parity = loss_parity(results, f"{method}-v{vocab}")
    peers_ok = [abs(parity[t]) <= LOSS_PARITY for t in PEERS if t in parity]
    row("first-step loss − TRL's, relative", parity, ".1e", with_ratios=False,
        target=f"peers within {LOSS_PARITY:g}" if peers_ok else "", ok=all(peers_ok) if peers_ok else None)
    checks = [
        {"vocab": vocab, "method": method, "target": f"pairs/s ≥{min_speed}× TRL", "measured": sp, "met": ok_speed},
        {"vocab": vocab, "method": method, "target": f"peak memory ≤{max_mem}× TRL", "measured": mem, "met": ok_mem},
        {"vocab": vocab, "method": method, "target": f"positions ≤{POSITIONS_TARGET}× lower bound",
         "measured": pos, "met": pos_ok},
    ] if judged_here else []
    checks += [{"vocab": vocab, "method": method, "measured": parity[t], "met": abs(parity[t]) <= LOSS_PARITY,
                "target": f"{SHORT[t]} first-step loss within {LOSS_PARITY:g} of TRL's"} for t in PEERS if t in parity]
    return rows, checks


PHASES = {"collate": "collate (in the dataloader)",
          "before_model": "compute_loss before the body (prefopt: 4-D mask)",
          "body_forward": "forward: embeddings + layers + final norm",
          "head_and_loss_forward": "forward: LM head, log-probs, loss (Liger: + their backward, taken here)",
          "head_and_loss_backward": "backward: loss, log-probs, LM head (prefopt: + chunk recompute)",
          "body_backward": "backward: layers + embeddings", "clip_and_optimizer": "grad clip + AdamW step",
          "other": "other (dataloader, logging, callbacks)"}


def phase_table(results: dict, vocab: int, method: str) -> list[str]:
    runs = {t: r for t in TRAINERS if (r := results["runs"].get(f"{t}-{method}-v{vocab}"))}
    if not runs:
        return []
    out = ["| phase (s/step) | " + " | ".join(SHORT[t] for t in runs) + " |", "|---|" + "---:|" * len(runs)]

    def line(label, value):
        out.append(f"| {label} | " + " | ".join(value(r) for r in runs.values()) + " |")

    for n, label in PHASES.items():
        line(label, lambda r: f"{r['summary']['phases_s_per_step'][n]:.3f}")
    line("**total**", lambda r: f"{r['summary']['seconds_per_step']:.3f}")
    line("(process CPU time, s/step)", lambda r: f"{r['summary']['cpu_s_per_step']:.3f}")
    line("(CPU time stolen by the hypervisor, s/step, whole VM)", lambda r: f"{r['summary']['steal_s_per_step']:.3f}")
    line("(machine speed before/after the run: GEMM GFLOP/s)",
         lambda r: "/".join(f"{x:.0f}" for x in r["summary"]["calibration_gflops"]))
    line("(the same, head-shaped matmul)",
         lambda r: "/".join(f"{x:.0f}" for x in r["summary"]["calibration_head_gflops"]))
    line("(cores used by other processes during the run)",
         lambda r: f"{r.get('others_load_cores', float('nan')):.2f}" + (" **contended**" if r.get("contended") else ""))
    return out


def sweep_table(results: dict, vocabs: list[int], lengths: list[int]) -> list[str]:
    sw = results["sweep"]
    head = "| max_length | unique tokens/step | positions/step | " + " | ".join(
        f"{v // 1000}k: peak − baseline (GB)" for v in vocabs) + " | " + " | ".join(
        f"{v // 1000}k: MB per unique token" for v in vocabs) + " |"
    out = [head, "|" + "---|" * (3 + 2 * len(vocabs))]
    for L in lengths:
        cells, per_tok, toks, pos = [], [], None, None
        for v in vocabs:
            r = sw.get(f"L{L}-v{v}")
            if r is None:
                cells.append("failed")
                per_tok.append("—")
                continue
            cells.append(f"{r['activation_gb']:.3f}")
            per_tok.append(f"{r['activation_gb'] * 1e3 / r['max_unique_tokens_per_step']:.3f}")
            toks, pos = r["max_unique_tokens_per_step"], r["max_positions_per_step"]
        out.append(f"| {L} | {fmt(toks, 'd') if toks else '—'} | {fmt(pos, 'd') if pos else '—'} | "
                   + " | ".join(cells) + " | " + " | ".join(per_tok) + " |")
    return out


def _versions_line(meta: dict) -> str:
    v = meta["versions"]
    peers = ", ".join(f"{p} {v[p]}" for p in PEER_PACKAGES if p in v)
    return (f"torch {v['torch']}, transformers {v['transformers']}, TRL {v['trl']}" + (f", {peers}" if peers else "")
            + f"; torch threads per run: {meta['threads']}")


def _speed_line(meta: dict) -> str:
    a, b = meta["calibration_start"], meta["calibration_end"]
    return (f"Machine speed (fp32, preallocated outputs, torch threads: {meta['threads']}): GEMM (best of 2048² "
            f"and 4096²) {a['gemm']:.0f} GFLOP/s at the start, {b['gemm']:.0f} at the end; the head's shape "
            f"{a['head_shape']} {a['head']:.0f} and {b['head']:.0f}. Each run's own before/after values are in its phase table; its "
            "FLOP fraction divides by the better of its two GEMM values.")


def _min_flops_line(results: dict) -> str:
    per = results["fixtures"]["min_gflop_per_pair_mean"]
    return ("Minimum GFLOP per pair, mean over the data: " + "; ".join(
        f"vocab {int(v):,}: " + ", ".join(f"{METHOD_TITLES[m]} {x:.1f}" for m, x in ms.items()) for v, ms in per.items())
        + ".")


def _peers_note(results: dict) -> list[str]:
    cce = next((r["cce_kernel_on_cpu"] for r in results["runs"].values() if "cce_kernel_on_cpu" in r), None)
    heads = {r["spec"]["trainer"]: r["head"] for r in results["runs"].values() if "head" in r}
    if not heads:
        return []
    lines = ["Peers (benchmarks/peers.py): TRL's own trainer, collator and padding; the body's last hidden state "
             "and the head weight go to " + "; ".join(f"{SHORT[t]}: {h}" for t, h in sorted(heads.items())) + "."]
    if cce:
        lines.append(f"cut-cross-entropy's own kernel (impl \"cce\") with CPU tensors {cce}: only impl "
                     "\"torch_compile\" runs here.")
    return [" ".join(lines), ""]


def render(results: dict, vocabs, methods, lengths) -> str:
    meta = results["meta"]
    lines = [f"# prefopt vs TRL {meta['versions']['trl']} and its peers: speed and memory", "",
             f"Command: `{meta['command']}`  ",
             f"prefopt source: git {str(meta['prefopt_source']['git_head'])[:8]} "
             f"(\"{meta['prefopt_source']['git_head_subject']}\")"
             f"{' + uncommitted changes' if meta['prefopt_source']['src_uncommitted_changes'] else ''}, "
             f"src sha1 {meta['prefopt_source']['src_sha1']}, frozen for the whole run  ",
             f"Machine: {meta['machine']}; {_versions_line(meta)}. Run took {meta['wall_s'] / 60:.1f} min.  ",
             _speed_line(meta), "",
             f"Model: tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 1024, untied, fp32); batch {BATCH}; "
             f"max_length {meta['max_length']}; lr 1e-6; seed {SEED}; {meta['warmup']} warm-up step(s), then "
             f"{meta['steps']} timed step(s) (TRL at 128k: {meta['trl_steps_large']}). Time per step = wall clock "
             "between consecutive `on_step_end` callbacks (includes collation, logging). Peak memory = "
             "ru_maxrss of the worker when training ends (before prefopt saves the model). Tokens = unique "
             "tokens of the pairs processed (prompt once + chosen + rejected after truncation, no padding); "
             "the positions lower bound is the same count. Minimum FLOPs of a step (benchmarks/flops.py "
             "`min_flops`): 6 × body linear weights × unique tokens + causal attention with the prompt computed "
             "once (4·H per query-key pair and layer, ×3 for backward) + 6 × H × V × the positions the loss "
             "scores; FLOP fraction = that / (step time × the GEMM rate). First-step loss: the loss the trainer "
             "returned for step 1 (the same weights and pairs in every run).", "", _min_flops_line(results),
             "", *_peers_note(results)]
    all_checks = []
    for v in vocabs:
        base = results["baseline"].get(str(v))
        if base:
            lines.append(f"Weights+grads+AdamW baseline at vocab {v:,}: {base['params'] / 1e6:.1f}M params, "
                         f"analytic 16 B/param = {base['analytic_bytes_weights_grads_adam'] / 1e9:.2f} GB; measured "
                         f"resident with libraries after two optimizer steps = {baseline_gb(base):.2f} GB "
                         f"(libraries alone {kib_to_gb(base['rss_after_imports_kib']):.2f} GB; the baseline process's "
                         f"own peak, with load/step transients, {kib_to_gb(base['maxrss_kib']):.2f} GB).  ")
    lines.append("")
    for v in vocabs:
        for m in methods:
            rows, checks = main_table(results, v, m)
            all_checks += checks
            lines += [f"## vocab {v:,} — {METHOD_TITLES[m]}", "", *rows, ""]
            for t in TRAINERS:
                check = results["order_check"].get(f"{t}-{m}-v{v}")
                if check:
                    lines.append(f"Same pairs in the same order as TRL, {COLUMNS[t]}: "
                                 f"**{'yes' if check['identical'] else 'NO'}** ({check['pairs_compared']} pairs "
                                 "compared by token-id fingerprint).  ")
            lines.append("")
            pt = phase_table(results, v, m)
            if pt:
                lines += ["Time per phase (mean over timed steps):", "", *pt, ""]
    if results.get("sweep"):
        lines += ["## prefopt memory sweep (CPO-SimPO, batch 4, saturated pairs: every branch truncated to max_length)",
                  "", "Peak ru_maxrss minus the weights+grads+AdamW baseline (resident, libraries included) of the same vocab.", "",
                  *sweep_table(results, vocabs, lengths), ""]
    results["checks"] = all_checks
    missed = [c for c in all_checks if c["met"] is False]
    lines += ["## Targets", ""]
    if results["meta"].get("quick"):
        lines += ["(Smoke run at max_length 256 with 1 timed step: the targets are for the full run.)", ""]
    for c in all_checks:
        status = "—" if c["met"] is None else ("met" if c["met"] else "**missed**")
        lines.append(f"- vocab {c['vocab']:,} {METHOD_TITLES[c['method']]}: {c['target']}: "
                     f"{fmt(c['measured'], '.3g')} → {status}")
    lines.append("")
    lines.append(f"{len(missed)} of {len(all_checks)} target checks missed." if all_checks else "")
    return "\n".join(lines)


WHAT_IFS = [
    ("default (packed)", {}),
    ("pack_length 1 (rows capped at the longest triple, the layout before 2b19048)", {"pack_length": 1}),
    ("layout shared (one row per pair)", {"layout": "shared"}),
    ("layout padded (TRL's rows, prefopt's head)", {"layout": "padded"}),
    ("attn_implementation eager (dense 4-D mask)", {"attn_implementation": "eager"}),
    ("logprob_chunk_size 128 tokens", {"logprob_chunk_size": 128}),
    ("logprob_chunk_size 512 tokens", {"logprob_chunk_size": 512}),
    ("logprob_chunk_size 2048 tokens", {"logprob_chunk_size": 2048}),
]


def profile_main(results, vocabs, folders, data, max_length, stem, t_start):
    """Where prefopt's time and memory go: op-level profiles of one step, and what-if configs."""
    warmup, timed = 1, 2
    results["meta"].update(warmup=warmup, steps=timed, mode="profile")
    results["profile"] = {}
    lines = ["# prefopt vs TRL: where the time and memory go", "",
             f"prefopt source: git {str(results['meta']['prefopt_source']['git_head'])[:8]}, src sha1 "
             f"{results['meta']['prefopt_source']['src_sha1']}"
             f"{' (+ uncommitted changes)' if results['meta']['prefopt_source']['src_uncommitted_changes'] else ''}.", "",
             f"Command: `{results['meta']['command']}`. CPO-SimPO unless named, batch {BATCH}, max_length {max_length}, "
             f"{warmup} warm-up step then {timed} timed steps (steps 2-3, the same pairs for every run). The op "
             "tables come from separate runs that profile step 2 (torch.profiler, CPU, self time; 'alloc MB' is the "
             "memory the op allocated), so the profiler's own cost is in none of the timings above them.", ""]
    for v in vocabs:
        print(f"vocab {v:,}:")
        base = launch({"trainer": "baseline", "model": str(folders[v]), "trainers": ["trl", "prefopt"]},
                      f"baseline-v{v}")
        base_gb = baseline_gb(base) if base else 0.0
        prof = results["profile"][str(v)] = {"baseline_gb": base_gb, "whatif": {}, "op_tables": {}}
        lines += [f"## vocab {v:,}", ""]
        common = {"method": "cpo_simpo", "model": str(folders[v]), "data": str(data), "max_length": max_length,
                  "batch": BATCH, "total_steps": warmup + timed}
        rows = ["| config | s/step | pairs/s | peak GB | peak − baseline GB | peak reached in | "
                "positions / lower bound | positions per step | stolen CPU s/step | machine GFLOP/s before/after | "
                "cores used by others |", "|---|---:|---:|---:|---:|---|---:|---|---:|---|---:|"]
        configs = [("TRL CPOTrainer (CPO-SimPO)", "trl", "cpo_simpo", None)]
        configs += [(name, "prefopt", "cpo_simpo", keys) for name, keys in WHAT_IFS]
        configs += [("TRL ORPOTrainer", "trl", "orpo", None), ("prefopt ORPO, default", "prefopt", "orpo", {})]
        for i, (name, trainer, method, keys) in enumerate(configs):
            spec = dict(common, trainer=trainer, method=method, extra_keys=keys or {})
            run, label = None, f"profile-{trainer}-{method}-{i}-v{v}"
            if trainer == "trl":
                # TRL does not change with prefopt's sources: reuse the main run's steps 1-3 when it has them
                for cached in sorted((CACHE / "runs").glob(f"*/trl-{method}-v{v}.json"), reverse=True):
                    old = json.loads(cached.read_text())
                    if (old["spec"]["data"], old["spec"]["max_length"]) == (str(data), max_length) \
                            and len(old["steps"]) >= warmup + timed and "calibration_start" in old:
                        run, name = old, name + f" (steps 2-3 of the main run {cached.parent.name})"
                        break
                if run is None and method != "cpo_simpo":
                    continue
            if run is None:
                run = launch(spec, label, timeout=600)
            if not run:
                log = (RUN_DIR / f"{label}.log").relative_to(ROOT)
                rows.append(f"| {name} | failed (see {log}) | | | | | | | | | |")
                prof["whatif"][name] = {"failed": True, "log": str(log)}
                continue
            S = summarise(run, warmup, warmup + timed)
            prof["whatif"][name] = {"summary": {k: S[k] for k in S if k != "fingerprints"}, "extra_keys": keys,
                                    "method": method, "trainer": trainer}
            rows.append(f"| {name} | {S['seconds_per_step']:.2f} | {S['pairs_per_s']:.3f} | {S['peak_gb']:.2f} | "
                        f"{S['peak_gb'] - base_gb:.2f} | {S['peak_reached_in']} | "
                        f"{S['positions_per_lower_bound']:.3f} | {', '.join(map(str, S['positions_per_step']))} | "
                        f"{S['steal_s_per_step']:.2f} | "
                        f"{'/'.join(f'{x:.0f}' for x in S['calibration_gflops'] if x is not None) or '—'} | "
                        f"{run.get('others_load_cores', float('nan')):.2f}{' contended' if run.get('contended') else ''} |")
        # op-level profiles: separate runs, because torch.profiler itself costs time and memory
        for name, trainer, method in (("TRL CPOTrainer (CPO-SimPO)", "trl", "cpo_simpo"),
                                      ("prefopt CPO-SimPO, default", "prefopt", "cpo_simpo"),
                                      ("prefopt ORPO, default", "prefopt", "orpo")):
            spec = dict(common, trainer=trainer, method=method, total_steps=2, profile_step=2)
            run = launch(spec, f"opprofile-{trainer}-{method}-v{v}", timeout=600)
            if run and run.get("op_table"):
                prof["op_tables"][name] = run["op_table"]
        lines += ["### Configurations (steps 2-3)", "", *rows, ""]
        ok = {n: w for n, w in prof["whatif"].items() if "summary" in w}
        ph = ["| phase (s/step) | " + " | ".join(ok) + " |", "|---|" + "---:|" * len(ok)]
        for key in ("collate", "before_model", "body_forward", "head_and_loss_forward", "head_and_loss_backward",
                    "body_backward", "clip_and_optimizer", "other"):
            ph.append(f"| {key} | " + " | ".join(f"{w['summary']['phases_s_per_step'][key]:.3f}"
                                                  for w in ok.values()) + " |")
        lines += ["### Phases", "", *ph, ""]
        for name, table in prof["op_tables"].items():
            lines += [f"### Top operators, {name} (step 2; {table['total_self_cpu_s']:.2f} s self CPU in all)", "",
                      "| op | calls | self CPU s | share | alloc MB |", "|---|---:|---:|---:|---:|"]
            for r in table["top_ops_by_time"][:14]:
                lines.append(f"| {r['op']} | {r['calls']} | {r['self_cpu_s']:.3f} | "
                             f"{r['self_cpu_s'] / table['total_self_cpu_s']:.1%} | {r['self_cpu_mem_mb']:.0f} |")
            lines += ["", "Largest single (op, shapes) by time:", "",
                      "| op | input shapes | calls | self CPU s | ms/call | GFLOP/s (matmuls) |", "|---|---|---:|---:|---:|---:|"]
            for r in table["top_by_time"][:12]:
                flops = matmul_flops(r["op"], r.get("shape_list"))
                rate = f"{flops * r['calls'] / r['self_cpu_s'] / 1e9:.0f}" if flops and r["self_cpu_s"] else ""
                lines.append(f"| {r['op']} | `{r['shapes']}` | {r['calls']} | {r['self_cpu_s']:.3f} | "
                             f"{1e3 * r['self_cpu_s'] / r['calls']:.1f} | {rate} |")
            lines.append("")
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    results["meta"]["calibration_end"] = flops.calibrate(vocabs[0])
    lines[4:4] = [_speed_line(results["meta"]), ""]
    text = "\n".join(lines)
    (HERE / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (HERE / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote benchmarks/{stem}.json and benchmarks/{stem}.md; total {results['meta']['wall_s'] / 60:.1f} min")


def peer_versions(trainers: list[str]) -> dict:
    """The installed versions of the peers' packages, refused by name when a peer is asked for without them."""
    from importlib.metadata import PackageNotFoundError, version

    if not set(trainers) & set(PEERS):
        return {}
    found, missing = {}, []
    for name in PEER_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"--trainers {','.join(trainers)} runs the peers, which need {', '.join(missing)}: run "
                         "`make bench` (it installs the pinned versions), or leave liger and cce out of --trainers")
    return found


def bench_method(results: dict, trainers: list[str], key: str, common: dict, warmup: int, steps: dict):
    """Every trainer on one method and vocabulary (`key` "cpo_simpo-v32000"), each in its own worker;
    then the table's shared steps, the same-pairs check and the first-step loss against TRL's."""
    for trainer in trainers:
        label = f"{trainer}-{key}"
        run = launch({**common, "trainer": trainer, "total_steps": warmup + steps[trainer]}, label)
        if run:
            run["summary"] = summarise(run, warmup)
            results["runs"][label] = run
            s = run["summary"]
            print(f"    {s['pairs_per_s']:.3f} pairs/s, {s['tokens_per_s']:.0f} tokens/s, peak {s['peak_gb']:.2f} GB, "
                  f"positions/lower bound {s['positions_per_lower_bound']:.3f}, "
                  f"FLOP fraction {s['flop_fraction']:.1%}, first-step loss {s['first_step_loss']:.6f}")
    done = [r for r in (results["runs"].get(f"{t}-{key}") for t in trainers) if r]
    if len({len(r["steps"]) for r in done}) > 1:
        # compare on the same pairs: the steps every run timed
        upto = min(len(r["steps"]) for r in done)
        for run in done:
            run["summary_all_steps"] = run["summary"]
            run["summary"] = summarise(run, warmup, upto)
            run["summary"]["fingerprints"] = run["summary_all_steps"]["fingerprints"]
        print(f"    table compares steps {warmup + 1}..{upto} of every run")
    a = results["runs"].get(f"trl-{key}")
    parity = loss_parity(results, key)
    for other in parity:
        b = results["runs"][f"{other}-{key}"]
        fa, fb = a["summary"]["fingerprints"], b["summary"]["fingerprints"]
        k = min(len(fa), len(fb))
        results["order_check"][f"{other}-{key}"] = {
            "identical": fa[:k] == fb[:k] and k > 0, "pairs_compared": k,
            "first_mismatch": next((i for i in range(k) if fa[i] != fb[i]), None)}
        print(f"    {other}: same pairs in the same order as TRL: {fa[:k] == fb[:k]} ({k} pairs); first-step loss "
              f"{b['summary']['first_step_loss']:.7f}, TRL's {a['summary']['first_step_loss']:.7f} "
              f"(relative {parity[other]:+.1e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: vocab 32000, max_length 256, 1+1 steps")
    ap.add_argument("--vocab", default=None, help="comma-separated vocab sizes (default 32000,128256)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, not timed (default 1)")
    ap.add_argument("--trl-steps-large-vocab", type=int, default=None,
                    help="timed TRL steps at vocab >= 100k (default 2: a TRL step takes ~40 s there)")
    ap.add_argument("--methods", default="cpo_simpo,orpo")
    ap.add_argument("--sweep-lengths", default=None, help="max_lengths of the memory sweep (default 256,512,1024,2048)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--trainers", default=",".join(TRAINERS),
                    help=f"comma-separated trainers of the main runs (default all: {','.join(TRAINERS)}); the "
                         "peers' loss check needs trl among them")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run and for the machine-speed probe")
    ap.add_argument("--busy-ok", action="store_true",
                    help="smoke runs on a shared machine: neither wait for a quiet machine nor measure a contended "
                         "run again (the timings then measure the neighbours too)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the benchmark: torch.profiler op tables of one step (prefopt and TRL) and "
                         "prefopt what-if runs (chunk size, pack_length, layout); writes results-profile.*")
    args = ap.parse_args()

    if args.worker:
        worker(json.loads(args.worker))
        return

    import signal

    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")  # subprocess.run then kills the running worker

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    trainers = args.trainers.split(",")
    unknown = sorted(set(trainers) - set(TRAINERS))
    if unknown:
        raise SystemExit(f"--trainers: {', '.join(unknown)} unknown; choose from {', '.join(TRAINERS)}")
    versions = peer_versions(trainers)
    lock = hold_machine()  # noqa: F841 - held until the process exits
    global RUN_DIR, THREADS, BUSY_OK
    THREADS, BUSY_OK = args.threads, args.busy_ok
    RUN_DIR = CACHE / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    t_start = time.perf_counter()
    quick = args.quick
    vocabs = [int(v) for v in (args.vocab or ("32000" if quick else "32000,128256")).split(",")]
    steps = args.steps or (1 if quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    trl_steps_large = min(steps, args.trl_steps_large_vocab or 2)
    max_length = 256 if quick else MAX_LENGTH
    methods = args.methods.split(",")
    lengths = [int(x) for x in (args.sweep_lengths or ("128,256" if quick else "256,512,1024,2048")).split(",")]
    sweep_steps = 2
    stem = "results-quick" if quick else "results"
    if args.profile:
        stem += "-profile"

    import torch
    import transformers
    import trl

    CACHE.mkdir(parents=True, exist_ok=True)
    gi = HERE / ".gitignore"
    if not gi.is_file():
        gi.write_text(".cache/\n")
    print(f"prefopt benchmark: vocab {vocabs}, methods {methods}, max_length {max_length}, batch {BATCH}, "
          f"{warmup} warm-up + {steps} timed steps")
    source = snapshot_src()
    print(f"prefopt source: {source['snapshot']} (HEAD {str(source['git_head'])[:8]} \"{source['git_head_subject']}\""
          f"{', plus uncommitted changes in src/' if source['src_uncommitted_changes'] else ''})")
    print("fixtures:")
    t = time.perf_counter()
    folders = {v: build_model_fixture(v) for v in vocabs}
    n_pairs = 512
    data = build_data_fixture("realistic", n_pairs, max_length)
    saturated = build_data_fixture("saturated", 64)
    print(f"  models {[str(f.relative_to(ROOT)) for f in folders.values()]}, data {data.relative_to(ROOT)}, "
          f"{saturated.relative_to(ROOT)} ({time.perf_counter() - t:.0f}s)")
    stats = data_stats(data, max_length)
    print(f"  realistic pairs: {stats['pairs']}; tokens p50/p90/p99/max: prompt "
          + "/".join(map(str, stats["prompt"].values())) + ", chosen " + "/".join(map(str, stats["chosen"].values()))
          + ", rejected " + "/".join(map(str, stats["rejected"].values()))
          + f"; {stats['pairs_truncated_at_max_length']} of {stats['pairs']} pairs truncated at max_length {max_length}")

    torch.set_num_threads(THREADS)
    wait_until_quiet()
    calibration_start = flops.calibrate(vocabs[0])
    print(f"machine speed (fp32, torch threads: {THREADS}): GEMM {calibration_start['gemm']:.0f} GFLOP/s, "
          f"head shape {calibration_start['head_shape']} {calibration_start['head']:.0f} GFLOP/s")
    results: dict = {
        "meta": {
            "calibration_start": calibration_start, "trainers": trainers, "busy_ok": BUSY_OK,
            "command": " ".join([".venv/bin/python", "benchmarks/bench.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "python": platform.python_version(), **versions},
            "threads": THREADS, "batch": BATCH, "max_length": max_length, "steps": steps, "warmup": warmup,
            "trl_steps_large": trl_steps_large, "seed": SEED, "quick": quick, "prefopt_source": source,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(RUN_DIR.relative_to(ROOT)),
        },
        "fixtures": {"data": str(data.relative_to(ROOT)), "saturated_data": str(saturated.relative_to(ROOT)),
                     "data_stats": stats, "models": {str(v): str(f.relative_to(ROOT)) for v, f in folders.items()},
                     "min_gflop_per_pair_mean": min_gflop_per_pair(data, max_length, folders, methods)},
        "baseline": {}, "runs": {}, "order_check": {}, "sweep": {},
    }

    if args.profile:
        profile_main(results, vocabs, folders, data, max_length, stem, t_start)
        return

    for v in vocabs:
        print(f"vocab {v:,}:")
        base = launch({"trainer": "baseline", "model": str(folders[v]), "trainers": trainers}, f"baseline-v{v}")
        if base:
            results["baseline"][str(v)] = base
        for m in methods:
            common = dict(method=m, model=str(folders[v]), data=str(data), max_length=max_length, batch=BATCH)
            bench_method(results, trainers, f"{m}-v{v}", common, warmup,
                         {t: trl_steps_large if (t == "trl" and v >= 100_000) else steps for t in trainers})

    if not args.no_sweep:
        sweep_data_stats = {L: data_stats(saturated, L) for L in lengths}
        results["fixtures"]["saturated_stats"] = sweep_data_stats
        print("memory sweep (prefopt, CPO-SimPO, saturated pairs):")
        for v in vocabs:
            for L in lengths:
                spec = {"trainer": "prefopt", "method": "cpo_simpo", "model": str(folders[v]), "data": str(saturated),
                        "max_length": L, "batch": BATCH, "total_steps": sweep_steps}
                run = launch(spec, f"sweep-L{L}-v{v}")
                if run and str(v) in results["baseline"]:
                    base_kib = results["baseline"][str(v)]["rss_kib"]
                    toks = [c["unique_tokens"] for c in run["collates"][:sweep_steps]]
                    results["sweep"][f"L{L}-v{v}"] = {
                        "max_length": L, "vocab": v, "peak_gb": kib_to_gb(run["maxrss_train_end_kib"]),
                        "baseline_gb": kib_to_gb(base_kib),
                        "activation_gb": kib_to_gb(run["maxrss_train_end_kib"] - base_kib),
                        "max_unique_tokens_per_step": max(toks),
                        "max_positions_per_step": max(s["positions"] for s in run["steps"]),
                        "step_intervals_s": [s["interval_s"] for s in run["steps"]],
                        "logprob_chunk_tokens": run.get("logprob_chunk_tokens"),
                    }
                    print(f"    peak − baseline {results['sweep'][f'L{L}-v{v}']['activation_gb']:.3f} GB, "
                          f"{max(toks)} tokens/step")

    results["meta"]["wall_s"] = time.perf_counter() - t_start
    results["meta"]["calibration_end"] = flops.calibrate(vocabs[0])
    text = render(results, vocabs, methods, lengths)
    # keep the JSON readable: drop the per-pair fingerprints (kept in the order check) and raw per-call data
    for run in results["runs"].values():
        run["summary"].pop("fingerprints", None)
        run.get("summary_all_steps", {}).pop("fingerprints", None)
        for c in run.get("collates", []):
            c.pop("fingerprints", None)
    (HERE / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (HERE / f"{stem}.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwrote benchmarks/{stem}.json and benchmarks/{stem}.md; total {results['meta']['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
