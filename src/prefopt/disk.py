"""Will the run's checkpoints fit? An estimate of what the schedule writes, against the free space
under `output_dir`, checked once the model is loaded and before step 1.

    need = estimate(cfg, model, tokenizer, train_pairs, resume_step, present)
    for warning in check(need, output_dir): ...        # a PrefoptError when it cannot fit

Why after loading, not from the config: the loaded model gives the exact numbers — which
parameters train (LoRA targets, `lora_modules_to_save`, trainable tokens), the dtype they are in,
tied weights counted once, the resized vocabulary, whether PEFT saves the embeddings with the
adapter — with no second reckoning of what `models.load_model` does that could drift from it. The
check still comes before the Trainer is built and before anything is written beyond the run's own
small files (`runs.commit`); a refused run is resumed or restarted like any run stopped there.

One checkpoint (the Trainer's `_save_checkpoint`, then prefopt's marks):
- the weights as they are held (their save dtype): the whole model, or under PEFT what
  `get_peft_model_state_dict` gives (the adapter, plus embedding layers it saves with it);
- the optimizer state unless `save_only_model`: per trainable parameter, `MOMENTS` tensors of its
  own dtype (torch's Adam-family `zeros_like` the parameter: two; 8-bit optimizers one byte each).
  Under DeepSpeed, `DEEPSPEED_BYTES` per trainable parameter (fp32 master copy and two fp32
  moments), plus, below ZeRO-3, the module's weights again in its model-states file. Sharding
  (ZeRO, FSDP) splits these bytes into one file per process; the total on a shared disk is the same,
  so it is not divided by the number of processes;
- the tokenizer (its `tokenizer.json`), and `SMALL` for the rest: config, scheduler, RNG states,
  trainer state (growing by `LOG_LINE` per logged step), training arguments, prefopt's marks.

How many exist at once: prefopt rotates only after a new checkpoint is complete, so at the peak
`save_total_limit` + 1 exist (+1 for the best checkpoint, kept apart when a best metric is tracked),
and the final model is written while `save_total_limit` (+ best) remain. Checkpoints of this run
already in output_dir are counted among them and not asked for again.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import PrefoptError

GB = 1e9
MARGIN = 1.2  # warn below this much free space per byte needed: other writers (the datasets cache, logs,
#               other jobs) share the disk, and a file system rounds files up to its blocks
SMALL = 1 << 20  # config, scheduler, RNG states, training arguments, marks, trainer state at the start
LOG_LINE = 2048  # each logged line in trainer_state.json's log history (prefopt logs some 30 metrics)
DEEPSPEED_BYTES = 12


@dataclass
class Estimate:
    weights: int  # bytes of the weights one save writes (model or adapter)
    optimizer: int  # bytes of optimizer state in one checkpoint (0 with save_only_model)
    other: int  # tokenizer and the small files
    saves: int  # checkpoints the schedule writes from here on
    kept: int | None  # save_total_limit (None: every one is kept)
    best: bool  # a best checkpoint is kept apart from the newest ones
    present: int  # complete checkpoints of this run already in output_dir
    what: str  # the weights and optimizer in words
    final: int = 0  # the final model: weights + tokenizer + small files

    @property
    def checkpoint(self) -> int:
        return self.weights + self.optimizer + self.other

    @property
    def at_most(self) -> int:
        """Checkpoints on disk at the peak: while one more is written, before rotation."""
        total = self.present + self.saves
        if not self.saves:
            return self.present
        room = total if self.kept is None else min(total, self.kept + 1 + self.best)
        return max(room, self.present)

    @property
    def needed(self) -> int:
        """Bytes still to find on the disk, at the worst moment of the run."""
        total = self.present + self.saves
        kept_at_end = total if self.kept is None else min(total, self.kept + self.best)
        peak = max(self.at_most * self.checkpoint, kept_at_end * self.checkpoint + self.final)
        return max(peak - self.present * self.checkpoint, 0)


def tensor_bytes(tensor) -> int:
    """Bytes `tensor` takes when saved; a parameter ZeRO-3 partitioned counts whole (`ds_numel`)."""
    return int(getattr(tensor, "ds_numel", tensor.numel())) * tensor.element_size()


def saved_weights(model) -> int:
    """The bytes the model's save writes: under PEFT what it saves of the adapter, else every
    parameter once (tied weights share one tensor) and the persistent buffers."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, save_embedding_layers="auto")
        size = sum(tensor_bytes(v) for v in state.values())
        trainable = sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)
        return max(size, trainable)  # (ZeRO-3: the state dict's tensors are the empty partitions)
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(
        tensor_bytes(b) for name, b in model.named_buffers() if _persistent(model, name))


def _persistent(model, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in getattr(module, "_non_persistent_buffers_set", set())


def moments(optim: str) -> float:
    """Optimizer state per trainable parameter, in units of the parameter's own size (8-bit
    optimizers are counted in bytes by the caller)."""
    optim = optim.lower()
    if "adafactor" in optim:
        return 0.0  # factored second moments: a row and a column per matrix
    if "sgd" in optim or "lion" in optim or "rmsprop" in optim:
        return 1.0
    return 2.0  # Adam-family (and anything unknown, on the safe side)


def optimizer_bytes(model, t, zero_stage: int | None, weights: int) -> tuple[int, str]:
    """The optimizer state one checkpoint holds, and how it was reckoned."""
    if t.save_only_model:
        return 0, "no optimizer state (save_only_model)"
    trainable = [p for p in model.parameters() if p.requires_grad]
    if zero_stage is not None:
        count = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)
        extra = weights if zero_stage < 3 else 0
        return (DEEPSPEED_BYTES * count + extra,
                f"DeepSpeed ZeRO-{zero_stage} optimizer state ({DEEPSPEED_BYTES} bytes per trainable parameter"
                + (", and the weights again in its model states)" if extra else ")"))
    optim = str(getattr(t.optim, "value", t.optim))
    if "8bit" in optim.lower():  # two 1-byte moments whatever the weights' dtype, and a 4-byte scale
        count = sum(p.numel() for p in trainable)  # per block of at least 256 values
        return int(2 * count * (1 + 4 / 256)), f"{optim} state (two 1-byte moments per trainable parameter)"
    share = moments(optim)
    return int(share * sum(tensor_bytes(p) for p in trainable)), f"{optim} state ({share:g}× the trainable weights)"


def count_saves(t, total_steps: int, steps_per_epoch: int, start: int) -> int:
    """Checkpoints the schedule writes after step `start`: every save_steps steps and at the last
    one (transformers saves at the end under `steps`), once an epoch, or at most one per evaluation
    (`best`)."""
    strategy = str(getattr(t.save_strategy, "value", t.save_strategy))
    if strategy == "no" or total_steps <= start:
        return 0
    if strategy == "epoch":
        return max(math.ceil(total_steps / steps_per_epoch) - start // steps_per_epoch, 0)
    every = t.save_steps if strategy == "steps" else t.eval_steps or t.logging_steps
    every = math.ceil(total_steps * every) if every < 1 else int(every)
    if strategy == "best" and str(getattr(t.eval_strategy, "value", t.eval_strategy)) == "epoch":
        every = steps_per_epoch
    saves = total_steps // every - start // every
    return saves + (strategy == "steps" and total_steps % every != 0)


def schedule(t, train_pairs: int) -> tuple[int, int]:
    """(optimizer steps of the whole run, steps per epoch), as the Trainer counts them."""
    per_process = math.ceil(train_pairs / (t.per_device_train_batch_size * t.world_size))
    per_epoch = max(math.ceil(per_process / t.gradient_accumulation_steps), 1)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    return total, per_epoch


def estimate(cfg, model, tokenizer, train_pairs: int, start: int = 0, present: int = 0,
             zero_stage: int | None = None) -> Estimate:
    """What the run will write (see the module's docstring), from the loaded model."""
    t = cfg.training
    weights = saved_weights(model)
    optimizer, how = optimizer_bytes(model, t, zero_stage, weights)
    total, per_epoch = schedule(t, train_pairs)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    other = (len(backend.to_str()) if backend is not None else 0) + SMALL
    other += LOG_LINE * math.ceil(total / max(t.logging_steps if t.logging_steps >= 1 else 1, 1))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    what = f"{'adapter' if hasattr(model, 'peft_config') else 'weights'} in {'/'.join(dtypes)}, {how}"
    return Estimate(weights=weights, optimizer=optimizer, other=other, saves=count_saves(t, total, per_epoch, start),
                    kept=t.save_total_limit, best=bool(t.metric_for_best_model), present=present, what=what,
                    final=weights + other)


def free_bytes(output_dir: str | Path) -> tuple[int, Path] | None:
    """Free bytes on the disk that holds output_dir (its nearest existing parent), or None where the
    file system does not say (a total of 0: some network and FUSE file systems)."""
    path = Path(output_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return (usage.free, path) if usage.total else None


def _gb(n: int) -> str:
    return f"{n / GB:.3g} GB"


def describe(need: Estimate) -> str:
    kept = "every one kept" if need.kept is None else f"save_total_limit {need.kept}"
    return (f"each checkpoint ≈ {_gb(need.checkpoint)} ({_gb(need.weights)} {need.what}; "
            f"{_gb(need.other)} tokenizer and state files), the final model ≈ {_gb(need.final)}; "
            f"{need.saves} checkpoint{'s' * (need.saves != 1)} to write, {kept}"
            + (", the best one kept apart" if need.best and need.kept is not None else "")
            + f": up to {need.at_most} at once, {_gb(need.needed)} in all")


FIXES = ("a smaller save_total_limit (1 keeps only the newest complete checkpoint), save_only_model: true "
         "(no optimizer state: such checkpoints cannot be resumed from), fewer saves (a larger save_steps, or "
         "save_strategy: no), or an output_dir on another disk")


def check(need: Estimate, output_dir: str | Path) -> list[str]:
    """Refuse a run whose checkpoints cannot fit on output_dir's disk; a warning (returned) when
    they fit with less than MARGIN to spare."""
    found = free_bytes(output_dir)
    if found is None or not need.needed:
        return []
    free, where = found
    if need.needed > free:
        raise PrefoptError(f"output_dir {output_dir}: the run's checkpoints will not fit: {describe(need)}, and the "
                           f"disk holding {where} has {_gb(free)} free. Make room, or set {FIXES}.")
    if need.needed * MARGIN > free:
        return [f"output_dir {output_dir}: the run's checkpoints will barely fit: {describe(need)}, and the disk "
                f"holding {where} has {_gb(free)} free (less than {MARGIN:g}× what they need). To be safe: {FIXES}."]
    return []


def keep_run_limit(cfg, plan, log) -> None:
    """A resumed run keeps the checkpoint limit it started with when this config leaves the key unset:
    prefopt's default of 2 must not rotate away the checkpoints of a run that began keeping them all
    (a run started before the default, whose saved config has no save_total_limit, or one set to
    null). A limit the config gives wins, as ever."""
    import yaml

    from .manifest import CONFIG_FILE

    saved = plan.out / CONFIG_FILE
    if plan.fresh or "save_total_limit" not in cfg.defaulted or not saved.is_file():
        return
    try:
        started = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # runs.plan has read this file already; nothing better to do here than the default
    limit = started.get("save_total_limit") if isinstance(started, dict) else None
    if limit != cfg.training.save_total_limit:
        cfg.training.save_total_limit = limit
        kept = "every checkpoint" if limit is None else f"the newest {limit} checkpoints"
        log(f"prefopt: resuming a run that kept {kept}: it goes on doing so (set save_total_limit to change it).")
