"""`PreferenceTrainer`: transformers' `Trainer` adapted to the step functions of `step.py`.

The Trainer runs the loop (data order, accumulation, optimizer, scheduler, checkpoints, logging);
this class only adapts its hooks: `get_batch_samples` counts the optimizer step's pairs and tokens
(`step.count`, summed over processes), `compute_loss` and `prediction_step` score and compose
(`step.score`, `step.loss`) and record the metrics (`metrics.MetricSums`), `log` adds the
reduced metrics to the logged line, and the checkpoint hooks make a checkpoint complete and
resumable exactly (`checkpoints`, `manifest`). The scorer (`scoring.choose_scorer`) is chosen once,
when training begins (`_ChooseScorer`, the first callback; outside training at its first use).

Every read or write of the Trainer's private attributes is in `_private_state` and
`_set_private_state`. Every logged line is also appended to `output_dir/metrics.jsonl`.
`collator_for_model` gives the collator a model takes (the layout chosen, segmented SDPA installed).
"""

import json
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from transformers import Trainer, TrainerCallback

from .attention import install_segmented_sdpa
from .collate import choose_layout, collator_for
from .config import Config
from .errors import NonFinite
from .metrics import MetricSums
from .checkpoints import mark_complete, rotate, start_writing
from .manifest import record_written
from .scoring import choose_scorer, prepare_head_for_fsdp
from .step import Counts, Objective, Scores, Step, count, logged_losses, loss, score

RESUME_STATE = "prefopt_resume_state.json"


def collator_for_model(cfg: Config, model, tokenizer, log=print):
    """The collator for `model`: the layout `cfg.data.layout` asks for where the model takes it
    (`collate.choose_layout`, which says why in one line where it does not), with the segmented
    attention installed when packed or shared rows go through SDPA."""
    config = model.config
    router_aux = bool(getattr(config.get_text_config(), "output_router_logits", False))
    layout, why = choose_layout(cfg.data.layout, config, config._attn_implementation, router_aux)
    if why:
        log(f"prefopt: {why}")
    if layout != "padded" and config._attn_implementation == "sdpa":
        install_segmented_sdpa()  # packed rows attend triple by triple (attention.segmented_sdpa)
    return collator_for(cfg, tokenizer.pad_token_id, layout, config._attn_implementation)


def ddp_find_unused(model, activation_checkpointing: bool) -> bool:
    """Whether DDP must look, after every backward, for parameters that got no gradient. In a
    causal LM's step every trainable parameter gets one — the full model, LoRA's matrices, the head
    (through the scorer's chunks and the diversity term too); the objectives add no parameters of
    their own — so not looking saves a traversal of the graph per step (and torch's warning that it
    found nothing). Two kinds of model do leave some out: mixture-of-experts models (an expert no
    token is routed to in a step) and models with other towers (vision, audio) that a text forward
    never runs. As transformers does, never under activation checkpointing, which the search breaks."""
    if activation_checkpointing:
        return False
    config = model.config
    text = config.get_text_config()
    experts = max((getattr(text, k, None) or 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    return experts > 1 or text is not config


class PreferenceTrainer(Trainer):
    # compute_loss already divides by the optimizer step's counts; the Trainer must not divide again
    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective, log=None, **kwargs):
        """`objective`: the resolved `schema.ObjectiveArgs`; `log`: where the scorer chosen is said
        (None: not said)."""
        super().__init__(*args, **kwargs)
        self.objective = objective
        config = self.accelerator.unwrap_model(self.model).config
        text = config.get_text_config()
        aux_coef = text.router_aux_loss_coef if getattr(text, "output_router_logits", False) else 0.0
        self.step_objective = Objective.of(objective, aux_coef)
        self._scorer, self._announce = None, log
        self._tied_under_fsdp = False
        if self.is_fsdp_enabled:
            self._tied_under_fsdp = prepare_head_for_fsdp(self.accelerator.unwrap_model(self.model),
                                                          self.accelerator.state.fsdp_plugin)
        self.metrics = MetricSums()
        self._step_finite, self._step_rows = torch.tensor(True, device=self.args.device), []
        self._last_grad_norm = None
        self._pending_resume = None
        self.stop_at_step, self._saved_at_step = None, None  # a signal's stop (stopping.py)
        self._loss_sum_before, self._steps_before = 0.0, 0  # what a resumed run did before its checkpoint
        self.callback_handler.callbacks.insert(0, _ChooseScorer(self))
        self.add_callback(_ApplyResume(self))
        self.add_callback(FiniteGuard(self))

    def _build_accelerator_args(self, **kwargs):
        # transformers looks for unused parameters unless activation checkpointing is on (always, for
        # a PEFT model); the user's ddp_find_unused_parameters stands, else ddp_find_unused decides
        built = super()._build_accelerator_args(**kwargs)
        if self.args.ddp_find_unused_parameters is None:
            checkpointing = self.args.activation_checkpointing or getattr(self.model, "is_activation_checkpointing",
                                                                           False)
            for handler in built.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.find_unused_parameters = ddp_find_unused(self.model, bool(checkpointing))
        return built

    # -- the Trainer's private state, read and written here only -------------------------------------

    def _private_state(self) -> dict:
        """The Trainer's running loss since the last log (this process's share, a tensor), the step
        last logged, and the loss logged so far."""
        return {"tr_loss": self._tr_loss, "last_logged": self._globalstep_last_logged,
                "logged_loss": self._total_loss_scalar}

    def _set_private_state(self, add_to_tr_loss: float, last_logged: int):
        """A resumed run's running loss and last logged step, as the checkpoint had them."""
        self._tr_loss += add_to_tr_loss
        self._globalstep_last_logged = last_logged

    # -- the step ----------------------------------------------------------------------------------

    def scorer(self, model):
        """The run's scorer, chosen at its first use (when the model is wrapped and, under ZeRO-3,
        partitioned) and said in one line."""
        if self._scorer is None:
            o = self.step_objective
            self._scorer = choose_scorer(
                self.accelerator.unwrap_model(model), fsdp=self.accelerator.distributed_type == DistributedType.FSDP,
                tied_under_fsdp=self._tied_under_fsdp, diversity=bool(o.diversity_weight),
                chunk=self.objective.logprob_chunk_size, keep_mb=self.objective.logprob_keep_mb,
                aux=bool(o.aux_coef))
            if self._announce is not None and self.is_world_process_zero():
                self._announce(f"prefopt: scoring: {self._scorer.name}")
        return self._scorer

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = Counts.total([count(b, self.step_objective) for b in batches]).as_tensor(device)  # one copy
        counts = Counts.from_tensor(self.accelerator.reduce(counts, reduction="sum"))
        return batches, counts  # reaches compute_loss as `num_items_in_batch`

    def _scored_step(self, model, batch, split: str, counts: Counts | None,
                     keep: int | None = None) -> tuple[Step, Scores]:
        """One micro-batch scored (its first `keep` pairs; None: all) and composed into the step's loss
        (normalised by `counts`; None: by this micro-batch's own), its metrics recorded under `split`;
        the step's result and the scores it came from."""
        scores = score(model, batch, self.scorer(model), keep, self.step_objective, counts)
        result = loss(scores, self.step_objective, counts)
        self.metrics.record(split, result, scores)
        return result, scores

    def _step(self, model, batch, split: str, counts: Counts | None, keep: int | None = None):
        return self._scored_step(model, batch, split, counts, keep)[0].loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # DDP/DeepSpeed/FSDP average gradients over processes; the factor turns that mean back into the
        # sum over all pairs, which the step's global counts then normalise.
        world = self.accelerator.num_processes if num_items_in_batch is not None else 1  # a direct call: its own step
        loss_ = world * self._step(model, inputs, "train", num_items_in_batch)
        self._step_rows.extend(zip(inputs["source"], inputs["row"]))
        if self.is_deepspeed_enabled:  # DeepSpeed steps inside backward: judge the loss before it
            if not torch.isfinite(loss_.detach()):
                raise self._non_finite(self.state.global_step + 1, "loss", self._step_rows)
        else:  # checked once per optimizer step (FiniteGuard): no device sync per micro-batch
            self._step_finite = self._step_finite & torch.isfinite(loss_.detach())
        return (loss_, {}) if return_outputs else loss_

    def _clip_grad_norm(self, model):
        self._last_grad_norm = norm = super()._clip_grad_norm(model)
        return norm

    @staticmethod
    def _non_finite(step: int, what: str, rows: list) -> NonFinite:
        shown = ", ".join(f"{src} row {row}" for src, row in rows[:20]) + (" …" if len(rows) > 20 else "")
        return NonFinite(
            f"step {step}: the {what} is not finite (NaN or inf); training stopped before applying it. Rows in "
            f"this step (this process): {shown}. Usual causes: a learning rate too high, fp16 overflow (use bf16), "
            "or a degenerate row. The last checkpoint in output_dir is intact; no final model was written."
        )

    def on_device(self, batch: dict) -> dict:
        """A collated batch with its tensors on this process's device (the Trainer's own placement)."""
        return self._prepare_inputs(batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.on_device(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss_ = self._step(model, inputs, "eval", None, self.eval_pairs_kept(len(inputs["row"])))
        return loss_.detach(), None, None

    def eval_pairs_kept(self, B: int) -> int:
        """How many of this micro-batch's pairs count. With several processes the evaluation
        sampler fills the last round of batches with pairs from the start of the set, so that every
        process gets as many batches; the real pairs of that round are its first `remainder`, in
        process order (accelerate's `gather_for_metrics` keeps the same ones)."""
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return B
        before = self.accelerator.process_index * self.args.per_device_eval_batch_size
        return max(0, min(B, state.remainder - before))

    # -- checkpoints -----------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, then (once every process has written its part) what a resume
        needs beyond it and the mark, with every file's checksum, that makes it complete; old
        checkpoints are rotated out only after that (prefopt's own rotation: only complete
        checkpoints it wrote), so a kill at any moment leaves a complete checkpoint to resume from."""
        run_dir = self.args.output_dir  # (hyperparameter search, the one other case, is not offered)
        checkpoint = Path(run_dir) / f"checkpoint-{self.state.global_step}"
        self._saved_at_step = self.state.global_step
        if self.args.should_save:
            start_writing(checkpoint)
        limit = getattr(self, "_save_limit", self.args.save_total_limit)
        super()._save_checkpoint(model, trial)
        resume_state = self._resume_state()  # collective: every process takes part
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            (checkpoint / RESUME_STATE).write_text(json.dumps(resume_state))
            mark_complete(checkpoint)
            rotate(run_dir, limit, keep=self.state.best_model_checkpoint)
            record_written(Path(run_dir))
        self.accelerator.wait_for_everyone()

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs):
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
        # stopping on a signal (stopping.StopOnSignal) saves here whatever save_strategy says
        # (`best` overrides the request with "is this a new best?")
        if self.stop_at_step == self.state.global_step and self._saved_at_step != self.state.global_step:
            self._save_checkpoint(model, trial)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the last step's checkpoint (a final save cut short), the Trainer would still
        # run one more step before checking max_steps when the run ends mid-epoch.
        if self.state.global_step >= self.state.max_steps > 0:
            return None
        return super()._run_epoch(*args, **kwargs)

    def train(self, *args, **kwargs):
        # The Trainer's own rotation (at the end of training too) deletes any folder named like
        # `checkpoint-N*`, a user's included: prefopt rotates its own complete checkpoints instead.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._save_limit = limit
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.save_total_limit = limit

    def _resume_state(self) -> dict:
        """What has been measured but not yet logged, summed over processes: the metric sums, the
        Trainer's running loss and the last logged step; and the loss sum logged so far (for the
        whole run's train_loss)."""
        private = self._private_state()
        running = private["tr_loss"].detach().double() / self.accelerator.num_processes
        sums, (tr_loss,) = self.metrics.state(lambda t: self.accelerator.reduce(t, reduction="sum"), self.args.device,
                                              [running])
        return {"metric_sums": sums, "tr_loss": tr_loss, "last_logged": private["last_logged"],
                "loss_sum": self._loss_sum_before + private["logged_loss"], "step": self.state.global_step}

    def restore(self, checkpoint: str | Path):
        """Resuming from `checkpoint`: put back what `_resume_state` saved (applied when training
        begins, after the Trainer has reset its own counters)."""
        path = Path(checkpoint) / RESUME_STATE
        if path.is_file():
            self._pending_resume = json.loads(path.read_text())
            return
        # written by another tool: rebuild the logged loss sum from its log history (steps after
        # its last log are not known; a resumed train_loss leaves them out)
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        logged = sorted((e["step"], e["loss"]) for e in state.get("log_history", []) if "loss" in e)
        loss_sum = sum(loss * (step - prev) for (step, loss), (prev, _) in zip(logged, [(0, 0.0)] + logged))
        self._pending_resume = {"metric_sums": {}, "tr_loss": 0.0, "loss_sum": loss_sum, "step": state["global_step"],
                                "last_logged": logged[-1][0] if logged else 0}

    def _apply_resume(self):
        saved, self._pending_resume = self._pending_resume, None
        if saved is None:
            return
        self.args.eval_on_start = False  # it ran when the run first started
        if not saved:
            return
        self._loss_sum_before, self._steps_before = saved["loss_sum"], saved["step"]
        self._set_private_state(saved["tr_loss"], saved["last_logged"])
        if self.is_world_process_zero():  # sums are global; log() adds up the processes' shares
            self.metrics.restore(saved["metric_sums"])

    # -- saving ----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The final model is always whole. Under FSDP with a sharded state dict the Trainer would
        write no weights here at all; gather a full one instead (checkpoints stay sharded), and
        keep one copy of tied weights, which gathering turns into separate tensors."""
        if not self.is_fsdp_enabled or _internal_call:
            return super().save_model(output_dir, _internal_call)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        state = self.accelerator.get_state_dict(self.model)
        aliases: dict[int, list[str]] = {}
        for name, p in self.accelerator.unwrap_model(self.model).named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        for names in aliases.values():
            for name in [n for n in names if n in state][1:]:
                del state[name]
        self._save(output_dir or self.args.output_dir, state_dict=state)

    # -- logging -------------------------------------------------------------------------------

    def log(self, logs: dict, start_time=None):
        if "train_loss" in logs:
            # The Trainer adds the loss not yet logged as this process's own share, and averages over
            # the steps since it (re)started; report the mean step loss of the whole run instead.
            running = self._private_state()["tr_loss"]
            local = float(running)
            shared = float(self.accelerator.reduce(running.detach().reshape(1), reduction="mean"))
            steps, before = self.state.global_step, self._steps_before
            total = logs["train_loss"] * (steps - before) - local + shared + self._loss_sum_before
            logs["train_loss"] = total / max(steps, 1)
        split = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if split is not None and self.metrics.names(split):
            prefix = "eval_" if split == "eval" else ""
            means = self.metrics.means(split, lambda t: self.accelerator.reduce(t, reduction="sum"), self.args.device)
            logs.update({prefix + name: value for name, value in means.items()})
            logged_losses(logs, prefix, self.step_objective, split)
        super().log(logs, start_time)


class FiniteGuard(TrainerCallback):
    """Stops training at the step whose loss or gradients are not finite, before the optimizer
    applies them, naming the step and the dataset rows in it. Nothing is saved after that: the
    last checkpoint stays the last good one, and no NaN weights become the final model.

    Gradients are judged by the norm gradient clipping already computed (non-finite exactly when
    some gradient is), else checked tensor by tensor. Not under fp16, where the loss scaler
    expects overflowing gradients and skips those steps itself; nor under DeepSpeed, which applies
    the update inside backward (there `compute_loss` checks each loss before its backward).
    """

    def __init__(self, trainer: "PreferenceTrainer"):
        self.trainer = trainer

    def _gradients_finite(self) -> torch.Tensor:
        tr = self.trainer
        device = tr._step_finite.device
        if tr.accelerator.scaler is not None or tr.is_deepspeed_enabled:
            return torch.ones((), dtype=torch.bool, device=device)
        if tr._last_grad_norm is not None:
            norm = tr._last_grad_norm
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else torch.as_tensor(norm)  # FSDP2: a DTensor
            return torch.isfinite(norm).to(device)
        # local shards under FSDP (DTensor); the flags are then combined over processes
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in tr.model.parameters() if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=device)
        return torch.stack([g.isfinite().all().to(device) for g in grads]).all()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        tr = self.trainer
        flags = torch.stack([tr._step_finite, self._gradients_finite()]).float()
        flags = tr.accelerator.reduce(flags, reduction="sum")
        loss_ok, grads_ok = (bool(f) for f in flags == tr.accelerator.num_processes)
        rows, tr._step_rows, tr._last_grad_norm = tr._step_rows, [], None
        tr._step_finite = torch.ones((), dtype=torch.bool, device=tr.args.device)
        if not (loss_ok and grads_ok):
            raise tr._non_finite(state.global_step + 1, "loss" if not loss_ok else "gradient", rows)


class _ChooseScorer(TrainerCallback):
    """When training begins (the model wrapped and, under ZeRO-3, partitioned), the scorer is chosen
    and said — the first callback, so before the progress bar starts; when it ends, the head's
    reused buffer is handed back (saving and evaluation need no [rows, V] buffer)."""

    def __init__(self, trainer: "PreferenceTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.scorer(self.trainer.model_wrapped)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.scorer(self.trainer.model_wrapped).workspace.release()


class _ApplyResume(TrainerCallback):
    """After the trackers' own on_train_begin (so what they created is recorded as the run's): a
    resume's state put back."""

    def __init__(self, trainer: "PreferenceTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._apply_resume()
        if state.is_world_process_zero and Path(args.output_dir).is_dir():
            record_written(Path(args.output_dir))  # what the trackers created (runs/) is the run's


class MetricsFile(TrainerCallback):
    """Appends every logged line (train and eval) as one JSON object to a file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
