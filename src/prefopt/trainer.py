"""The training step: a thin `transformers.Trainer` subclass.

One forward pass per micro-batch through the (possibly DDP/DeepSpeed/FSDP-wrapped) model,
per-token log-probs of the scored positions through the LM head in chunks, per-sequence sums,
then — in this one place —

    loss = Σ_pairs preference_loss / pairs + nll_weight · Σ_tokens NLL / nll_tokens   [+ MoE aux]

where `pairs` and `nll_tokens` count the whole optimizer step (all accumulation micro-batches
on all processes). That makes the step's loss and gradients independent of how the global batch
is split, and equal to TRL's `losses.mean() + cpo_alpha · nll` when it is one micro-batch.

Metrics keep TRL's names and are accumulated as sums and counts, reduced across processes when
logged. Every logged line is also appended to `output_dir/metrics.jsonl`.
"""

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback

from .collate import model_inputs
from .config import ObjectiveArgs
from .diversity import aligned_pairs, score_with_diversity
from .diversity import counts as diversity_counts
from .diversity import terms_from_logits as diversity_terms_from_logits
from .logprobs import TokenScores, chunk_size_for, frozen_zero3_copy, head_transform, logps_from_logits, per_sequence, scored_hidden, token_logps
from .errors import PrefoptError
from .losses import LOSSES, METHODS, Hyper
from .runs import mark_complete, record_written, rotate, start_writing

RESUME_STATE = "prefopt_resume_state.json"
EVAL_LOSS_PART = "preference_loss"  # summed per pair in evaluation; folded into eval_loss when logged


class PreferenceTrainer(Trainer):
    # compute_loss already divides by the optimizer step's counts; the Trainer must not divide again
    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective: ObjectiveArgs, **kwargs):
        super().__init__(*args, **kwargs)
        o = objective
        method = METHODS[o.method]
        self.objective = o
        self.loss_fn = LOSSES[o.loss_type]
        self.hyper = Hyper(beta=o.beta, gamma_beta_ratio=o.gamma_beta_ratio, label_smoothing=o.label_smoothing,
                           alpha=o.alpha)
        self.mean_logps = method.losses[o.loss_type] == "mean"
        self.nll_over_prompt = method.nll_span == "prompt+completion"
        config = self.accelerator.unwrap_model(self.model).config
        text = config.get_text_config()
        self.head_fn = head_transform(config)
        self.chunk = chunk_size_for(text.vocab_size, o.logprob_chunk_size)
        self.aux_coef = text.router_aux_loss_coef if getattr(text, "output_router_logits", False) else 0.0
        # FSDP shards the head's weight outside its own forward: call the module there
        self.fused_head = False if self.accelerator.distributed_type == DistributedType.FSDP else None
        self.head_in_forward = False
        self.diversity_weight = o.diversity_weight
        self._step_finite, self._step_rows = torch.tensor(True, device=self.args.device), []
        self._last_grad_norm = None
        self._pending_resume = None
        self.stop_at_step, self._saved_at_step = None, None  # a signal's stop (stopping.py)
        self.add_callback(_ApplyResume(self))
        self._loss_sum_before, self._steps_before = 0.0, 0  # what a resumed run did before its checkpoint
        self.add_callback(FiniteGuard(self))
        if self.is_fsdp_enabled:
            self._head_as_own_fsdp_unit()
        # split -> metric name -> [sum, count], tensors on the device until logged
        self._metric_sums = {"train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}

    def _head_as_own_fsdp_unit(self):
        """Make the LM head its own FSDP unit, so calling it after the model's forward gathers and
        frees its weight through its own hooks. (accelerate otherwise groups it with the final norm,
        and a second call of that group outside the model's forward crashed in backward.)"""
        plugin = self.accelerator.state.fsdp_plugin
        model = self.accelerator.unwrap_model(self.model)
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        if tied:
            # A tied head must share its unit with the embeddings, which the model's forward
            # already used: score through the model's own head call instead (its logits exist
            # for the scored columns at once, no chunking).
            self.head_in_forward = True
            return
        if type(head) is torch.nn.Linear:
            head.__class__ = OutputHead
        if type(head) is OutputHead and plugin.auto_wrap_policy is not None:
            names = plugin.transformer_cls_names_to_wrap
            if names is None:
                names = list(getattr(model, "_no_split_modules", None) or [])
            plugin.transformer_cls_names_to_wrap = [*names, OutputHead.__name__]

    # -- normalisers for the whole optimizer step ---------------------------------------------

    def _nll_positions(self, batch) -> torch.Tensor:
        B = len(batch["row"])
        return (batch["score_seq"] < B) & (batch["score_is_completion"] | self.nll_over_prompt)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.tensor(
            [[len(b["row"]), int(self._nll_positions(b).sum()), *(diversity_counts(b) if self.diversity_weight
                                                                  else (0, 0))] for b in batches]
            or [[0, 0, 0, 0]], dtype=torch.float64
        ).sum(0).to(device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return batches, {"pairs": counts[0], "nll_tokens": counts[1], "div_tokens": counts[2],
                         "div_positions": counts[3]}

    # -- the step --------------------------------------------------------------------------

    def _forward(self, model, batch, keep: int | None = None):
        """Per-sequence log-probs and the NLL pieces for one micro-batch; with `keep`, of its first
        `keep` pairs only (the rest are the evaluation sampler's padding duplicates)."""
        B = len(batch["row"])
        keep = B if keep is None else keep
        extra = {"output_router_logits": True} if self.aux_coef else {}
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = {"input_ids": batch["input_ids"], **model_inputs(batch, unwrapped.config, unwrapped.dtype),
                  "use_cache": False, **extra}
        seq, completion = batch["score_seq"], batch["score_is_completion"]
        if self.diversity_weight:
            pairs_c, pairs_r, chosen_rows = aligned_pairs(seq, batch["score_index"], completion, B)
            if keep < B:
                live = seq[pairs_c] < keep
                pairs_c, pairs_r, chosen_rows = pairs_c[live], pairs_r[live], chosen_rows[seq[chosen_rows] < keep]
        entropy = kl = None
        if self.head_in_forward:
            # the model's own head, on the scored columns only (see _head_as_own_fsdp_unit)
            T = batch["input_ids"].shape[1]
            columns, where = torch.unique(batch["score_index"] % T, return_inverse=True)
            out = model(**inputs, logits_to_keep=columns)
            z = out.logits[batch["score_index"] // T, where]  # [N, V]: scored position i at its row, kept column
            tok = logps_from_logits(z, batch["score_target"])
            if self.diversity_weight:
                entropy, kl = diversity_terms_from_logits(z, pairs_c, pairs_r, chosen_rows)
        else:
            # the model's own head sees one position; ours sees the scored ones, in chunks
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            head = unwrapped.get_output_embeddings()
            if self.diversity_weight:
                h = scored_hidden(out.hidden_states[-1], batch["score_index"], head)
                logps_all, means, entropy, kl = score_with_diversity(
                    h, batch["score_target"], pairs_c, pairs_r, chosen_rows, frozen_zero3_copy(head) or head,
                    self.head_fn, self.chunk)
                tok = TokenScores(logps_all, means)
            else:
                tok = token_logps(out.hidden_states[-1], batch["score_index"], batch["score_target"], head,
                                  self.head_fn, self.chunk, self.fused_head)
        logp_sum, n_tokens = per_sequence(tok.logps, seq, completion, 2 * B)
        logps = logp_sum / n_tokens.clamp(min=1) if self.mean_logps else logp_sum
        nll_mask = self._nll_positions(batch)
        logit_sum, _ = per_sequence(tok.mean_logits, seq, completion, 2 * B)
        if keep < B:
            nll_mask = nll_mask & (seq < keep)
            live = torch.cat([torch.arange(keep), B + torch.arange(keep)]).to(logps.device)
            logps, n_tokens, logit_sum = logps[live], n_tokens[live], logit_sum[live]
        return {
            "chosen_logps": logps[:keep],
            "rejected_logps": logps[keep:],
            "nll_sum": -(tok.logps * nll_mask).sum(),
            "nll_tokens": nll_mask.sum(),
            "completion_tokens": n_tokens.detach(),
            "logit_sum": logit_sum,
            "aux_loss": out.aux_loss if self.aux_coef else None,
            "entropy_sum": entropy,
            "kl_sum": kl,
            "entropy_tokens": len(chosen_rows) if entropy is not None else 0,
            "kl_positions": len(pairs_c) if entropy is not None else 0,
        }

    def _loss(self, model, batch, split: str, counts: dict | None, keep: int | None = None):
        f = self._forward(model, batch, keep)
        B = f["chosen_logps"].shape[0]
        losses, chosen_rewards, rejected_rewards, extras = self.loss_fn(f["chosen_logps"], f["rejected_logps"], self.hyper)
        if counts is None:  # evaluation or a direct call: this micro-batch is the whole batch
            pairs, nll_tokens, world = B, f["nll_tokens"], 1
        else:
            pairs, nll_tokens, world = counts["pairs"], counts["nll_tokens"], self.accelerator.num_processes
        # DDP/DeepSpeed/FSDP average gradients over processes; `world` turns that mean back into the sum
        # over all pairs, which the global counts then normalise.
        w = self.objective.nll_weight
        nll = f["nll_sum"] / torch.clamp(torch.as_tensor(nll_tokens, dtype=torch.float32), min=1) if w else None
        loss = losses.sum() / pairs + (w * nll if w else 0.0)
        if f["aux_loss"] is not None:
            loss = loss + self.aux_coef * f["aux_loss"] * (B / pairs)
        if f["entropy_sum"] is not None:
            # means over the step's chosen completion tokens and aligned positions, like the NLL term
            tokens, positions = ((f["entropy_tokens"], f["kl_positions"]) if counts is None
                                 else (counts["div_tokens"], counts["div_positions"]))
            a = self.objective.diversity_alpha
            mean = lambda total, n: total / torch.clamp(torch.as_tensor(n, dtype=torch.float32), min=1)  # noqa: E731
            loss = loss + self.diversity_weight * (-a * mean(f["entropy_sum"], tokens)
                                                   + (1 - a) * mean(f["kl_sum"], positions))
        self._record(split, f, chosen_rewards, rejected_rewards, extras, nll, losses)
        return world * loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self._loss(model, inputs, "train", num_items_in_batch)
        self._step_rows.extend(zip(inputs["source"], inputs["row"]))
        if self.is_deepspeed_enabled:  # DeepSpeed steps inside backward: judge the loss before it
            if not torch.isfinite(loss.detach()):
                raise self._non_finite(self.state.global_step + 1, "loss", self._step_rows)
        else:  # checked once per optimizer step (FiniteGuard): no device sync per micro-batch
            self._step_finite = self._step_finite & torch.isfinite(loss.detach())
        return (loss, {}) if return_outputs else loss

    def _clip_grad_norm(self, model):
        self._last_grad_norm = norm = super()._clip_grad_norm(model)
        return norm

    @staticmethod
    def _non_finite(step: int, what: str, rows: list) -> PrefoptError:
        shown = ", ".join(f"{src} row {row}" for src, row in rows[:20]) + (" …" if len(rows) > 20 else "")
        return PrefoptError(
            f"step {step}: the {what} is not finite (NaN or inf); training stopped before applying it. Rows in "
            f"this step (this process): {shown}. Usual causes: a learning rate too high, fp16 overflow (use bf16), "
            "or a degenerate row. The last checkpoint in output_dir is intact; no final model was written."
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self._loss(model, inputs, "eval", None, self.eval_pairs_kept(len(inputs["row"])))
        return loss.detach(), None, None

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
        run_dir = self._get_output_dir(trial=trial)
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
        names = {split: sorted(d) for split, d in self._metric_sums.items()}
        values = [torch.as_tensor(v, dtype=torch.float64, device=self.args.device).reshape(())
                  for split in names for n in names[split] for v in self._metric_sums[split][n]]
        values.append(self._tr_loss.detach().double().reshape(()) / self.accelerator.num_processes)
        total = self.accelerator.reduce(torch.stack(values), reduction="sum").tolist()
        sums, i = {}, 0
        for split in names:
            sums[split] = {}
            for n in names[split]:
                sums[split][n] = total[i : i + 2]
                i += 2
        return {"metric_sums": sums, "tr_loss": total[-1], "last_logged": self._globalstep_last_logged,
                "loss_sum": self._loss_sum_before + self._total_loss_scalar, "step": self.state.global_step}

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
        self._tr_loss += saved["tr_loss"]
        self._globalstep_last_logged = saved["last_logged"]
        if self.is_world_process_zero():  # sums are global; log() adds up the processes' shares
            for split, entries in saved["metric_sums"].items():
                self._metric_sums[split].update({k: list(v) for k, v in entries.items()})

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

    # -- metrics -----------------------------------------------------------------------------

    def _record(self, split, f, chosen_rewards, rejected_rewards, extras, nll, losses):
        sums = self._metric_sums[split]
        B = chosen_rewards.shape[0]

        def add(name, total, count):
            entry = sums[name]
            entry[0] = entry[0] + total.detach().double()
            entry[1] = entry[1] + count

        per_pair = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).double(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": f["chosen_logps"],
            "logps/rejected": f["rejected_logps"],
            **extras,
        }
        for name, values in per_pair.items():
            add(name, values.sum(), B)
        # TRL averages logits over every position of the padded batch; prefopt over the scored
        # completion tokens (the same thing without the layout's padding and prompt).
        tokens = f["completion_tokens"]
        add("lengths/chosen", tokens[:B].sum(), B)  # completion tokens per response (after truncation)
        add("lengths/rejected", tokens[B:].sum(), B)
        add("logits/chosen", f["logit_sum"][:B].sum(), tokens[:B].sum())
        add("logits/rejected", f["logit_sum"][B:].sum(), tokens[B:].sum())
        # TRL's nll_loss is the NLL term's value: 0 when the method has no NLL term.
        add("nll_loss", f["nll_sum"] if nll is not None else torch.zeros(()), f["nll_tokens"] if nll is not None else 1)
        if f["aux_loss"] is not None:
            add("aux_loss", f["aux_loss"], 1)
        if f["entropy_sum"] is not None:
            add("diversity/entropy", f["entropy_sum"], f["entropy_tokens"])
            add("diversity/kl", f["kl_sum"], f["kl_positions"])
        if split == "eval":  # eval_loss from sums over all pairs, like every other metric
            add(EVAL_LOSS_PART, losses.sum(), B)

    def _eval_loss(self, logs: dict, prefix: str) -> float:
        """The loss over the whole evaluation set: the mean preference loss over its pairs plus the
        NLL term over its tokens (and MoE/diversity terms), whatever the batches and processes."""
        loss = logs.pop(prefix + EVAL_LOSS_PART)
        if self.objective.nll_weight:
            loss += self.objective.nll_weight * logs[prefix + "nll_loss"]
        if prefix + "aux_loss" in logs:
            loss += self.aux_coef * logs[prefix + "aux_loss"]
        if prefix + "diversity/loss" in logs:
            loss += self.diversity_weight * logs[prefix + "diversity/loss"]
        return loss

    def log(self, logs: dict, start_time=None):
        if "train_loss" in logs:
            # The Trainer adds the loss not yet logged as this process's own share, and averages over
            # the steps since it (re)started; report the mean step loss of the whole run instead.
            local = float(self._tr_loss)
            shared = float(self.accelerator.reduce(self._tr_loss.detach().reshape(1), reduction="mean"))
            steps, before = self.state.global_step, self._steps_before
            total = logs["train_loss"] * (steps - before) - local + shared + self._loss_sum_before
            logs["train_loss"] = total / max(steps, 1)
        split = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if split is not None and self._metric_sums[split]:
            names = sorted(self._metric_sums[split])
            device = self.args.device
            table = torch.stack([
                torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                             for v in self._metric_sums[split][n]])
                for n in names
            ])
            table = self.accelerator.reduce(table, reduction="sum")
            prefix = "eval_" if split == "eval" else ""
            for name, (total, count) in zip(names, table.tolist()):
                logs[prefix + name] = total / count if count else math.nan
            if prefix + "diversity/entropy" in logs:
                a = self.objective.diversity_alpha
                logs[prefix + "diversity/loss"] = (-a * logs[prefix + "diversity/entropy"]
                                                   + (1 - a) * logs[prefix + "diversity/kl"])
            if split == "eval":
                logs["eval_loss"] = self._eval_loss(logs, prefix)
            self._metric_sums[split].clear()
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


class _ApplyResume(TrainerCallback):
    def __init__(self, trainer: "PreferenceTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._apply_resume()
        if state.is_world_process_zero and Path(args.output_dir).is_dir():
            record_written(Path(args.output_dir))  # what the trackers created (runs/) is the run's


class OutputHead(torch.nn.Linear):
    """The LM head, under FSDP: a plain Linear with a class of its own, so the wrap policy can
    make it a separate FSDP unit (see `PreferenceTrainer._head_as_own_fsdp_unit`)."""


class MetricsFile(TrainerCallback):
    """Appends every logged line (train and eval) as one JSON object to a file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
