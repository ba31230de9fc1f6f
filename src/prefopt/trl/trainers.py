"""`CPOTrainer` and `ORPOTrainer` with TRL 1.16's constructor, on prefopt's path.

    from prefopt.trl import CPOConfig, CPOTrainer        # was: from trl.experimental.cpo import ...
    trainer = CPOTrainer(model, args=CPOConfig(output_dir="runs/a", loss_type="simpo"),
                         train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    trainer.train(); trainer.evaluate(); trainer.save_model()
    print(trainer.explain())

Each is a `trainer.PreferenceTrainer` (so a `transformers.Trainer`: `train`, `evaluate`,
`save_model`, `push_to_hub`, `state.log_history`, callbacks, `compute_metrics`, `optimizers`)
built the way `pipeline.build_trainer` builds prefopt's own: the datasets through prefopt's data
path, the layout chosen and the segmented attention installed as there, the loss composed by
`step.loss` and scored by the fused head. The metrics logged carry TRL's names.

Subclasses work as on TRL where they override the Trainer's methods (`compute_loss`, `log`,
`create_optimizer`, `create_scheduler`, samplers) or add callbacks; `store_metrics` adds values
to the next logged line as TRL's does. An override of a TRL-internal step (`get_batch_loss_metrics`,
`concatenated_forward`, `cpo_loss`, `tokenize_row`, ...) would never be called here, so it is
refused when the trainer is built.
"""

from collections import defaultdict

import torch

from .. import evalgen
from ..config import explain as explain_config
from ..errors import PrefoptError
from ..guidance import GuidanceCallback
from ..report import format_report
from ..trainer import PreferenceTrainer, collator_for_model
from .configs import CPOConfig, ORPOConfig
from .model import model_of, tokenizer_of
from .translate import config_of, described, refuse, tokenized

# TRL's own steps, which prefopt's path replaces: overriding one would change nothing here
TRL_INTERNALS = ("get_batch_loss_metrics", "concatenated_forward", "concatenated_inputs", "get_batch_logps",
                 "cpo_loss", "odds_ratio_loss", "tokenize_row", "build_tokenized_answer", "generate_from_model")

CPO_ALPHA_NOTE = ("cpo_alpha: the weight of the NLL term on the chosen completion; TRL's default 1.0 is kept, so "
                  "loss_type='simpo' trains CPO-SimPO (SimPO + 1·NLL), not the SimPO paper's objective "
                  "(cpo_alpha=0.0); loss_type='alphapo' sets it to 0, as TRL does.")


class _DropIn(PreferenceTrainer):
    _kind = ""
    _config_class = None
    _tag_names = ["prefopt"]

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, compute_metrics=None):
        args = self._config_class(output_dir="trainer_output") if args is None else args
        self._check_args(args)
        given = dict(model=model, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     processing_class=processing_class, model_init=model_init,
                     preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        refuse(self._kind, args, given)
        self._check_overrides()
        main = args.process_index == 0
        say = print if main else (lambda *a: None)
        args.remove_unused_columns = False  # the collator reads the tokenized columns (TRL sets it too)
        cfg = config_of(self._kind, args, model if isinstance(model, str) else None)
        tokenizer = tokenizer_of(model, processing_class, cfg)
        with args.main_process_first(desc="tokenizing"):
            train, train_report = tokenized(train_dataset, "train_dataset", tokenizer, cfg)
            evals, eval_report = tokenized(eval_dataset, "eval_dataset", tokenizer, cfg)
        evalgen.check(described(cfg, train, evals, model), cfg.source)
        self.data_report = {"train": train_report, "eval": eval_report}
        say(format_report(self.data_report))
        as_given, model = model, model_of(model, args, cfg, tokenizer, peft_config)
        self.prefopt_config = cfg = described(cfg, train, evals, as_given)
        collator = collator_for_model(cfg, model, tokenizer, say)
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        super().__init__(
            model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collator,
            processing_class=tokenizer, compute_metrics=compute_metrics, optimizers=optimizers,
            callbacks=[GuidanceCallback(lambda message: say(f"prefopt: warning: {message}")), *(callbacks or [])],
            objective=cfg.objective, log=say)
        if cfg.run.generate_during_eval and evals is not None:
            self.add_callback(evalgen.EvalGenerations(self, evals, tokenizer, cfg.run, cfg.data))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(list(self._tag_names) + list(getattr(self, "tag_names", [])))

    def _check_args(self, args):
        theirs = self._config_class.__name__
        if theirs not in [c.__name__ for c in type(args).__mro__]:  # ours, TRL's, or a subclass of either
            raise PrefoptError(f"{self._kind}Trainer: args is a {type(args).__name__}, not a {theirs}; build it with "
                               f"prefopt.trl.{theirs}(...) (TrainingArguments' fields and {self._kind}'s own).")

    def _check_overrides(self):
        for name in TRL_INTERNALS:
            if hasattr(type(self), name):
                raise PrefoptError(
                    f"{type(self).__name__}.{name}: overrides a step of TRL's own that prefopt replaces (its data "
                    "pipeline, forward and loss), so it would never be called. Override compute_loss (call "
                    "super().compute_loss and change its result), or add a callback, instead.")

    def explain(self) -> str:
        """The objective this trainer optimizes, with its formula and the effective values."""
        text = explain_config(self.prefopt_config, processes=self.args.world_size)
        return text + ("\n  " + CPO_ALPHA_NOTE if self._kind == "CPO" else "")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's `train`; resuming (a checkpoint folder, or True: the newest in output_dir) also
        puts back what prefopt's checkpoint holds beyond the Trainer's: the metric sums not yet logged and
        the loss of the steps before it, so the logged lines and train_loss continue as if uninterrupted."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise PrefoptError(f"train(resume_from_checkpoint=True): {self.args.output_dir} holds no checkpoint-N "
                                   "folder to resume from; pass a checkpoint's path, or train without it.")
        if resume_from_checkpoint:
            self.restore(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- TRL's logging hooks -------------------------------------------------------------------

    def store_metrics(self, metrics: dict, train_eval: str = "train") -> None:
        """Values added to the next logged line of that split (their mean), as TRL's trainers do."""
        for key, value in metrics.items():
            self._stored_metrics[train_eval][key].append(float(value))

    def log(self, logs: dict, start_time=None):
        split = "train" if "loss" in logs else "eval"
        for key, values in self._stored_metrics.pop(split, {}).items():
            logs[key] = torch.tensor(values).mean().item()
        super().log(logs, start_time)

    # -- compute_metrics ------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """With `compute_metrics`, the predictions TRL gives it: per batch, the mean logit of the chosen
        and of the rejected completions (here over their completion tokens), and zeros as labels."""
        if prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self.on_device(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            result, scores = self._scored_step(model, inputs, "eval", None, self.eval_pairs_kept(len(inputs["row"])))
        K, tokens = scores.pairs, scores.tokens
        means = {"eval_logits/chosen": scores.logit_sum[:K].sum() / tokens[:K].sum().clamp(min=1),
                 "eval_logits/rejected": scores.logit_sum[K:].sum() / tokens[K:].sum().clamp(min=1)}
        ignore = ignore_keys or []
        logits = torch.stack([v.float() for k, v in means.items() if k not in ignore])
        return result.loss.detach(), logits, torch.zeros(logits.shape[0], device=logits.device)


class CPOTrainer(_DropIn):
    """TRL 1.16's `CPOTrainer` (`trl.experimental.cpo`), same arguments, on prefopt's path.

    The objective is TRL's for the same `CPOConfig`: sigmoid/hinge/ipo are CPO plus `cpo_alpha`·NLL;
    simpo is SimPO's loss with the absolute margin `simpo_gamma` plus `cpo_alpha`·NLL — at TRL's
    default `cpo_alpha=1.0` that is CPO-SimPO, not the SimPO paper's objective (`cpo_alpha=0.0`);
    alphapo is simpo with `cpo_alpha` 0. `explain()` prints the objective resolved.

    Refused, naming the argument: `data_collator`, `model_init`, `preprocess_logits_for_metrics`,
    an encoder-decoder model, `eval_dataset` as a dict, `model_init_kwargs` with a model object,
    `use_liger_kernel`, and subclass overrides of TRL's internal steps.
    """

    _kind, _config_class = "CPO", CPOConfig
    _tag_names = ["prefopt", "cpo"]
    _name = "CPO"


class ORPOTrainer(_DropIn):
    """TRL 1.16's `ORPOTrainer` (`trl.experimental.orpo`), same arguments, on prefopt's path:
    NLL over prompt and chosen completion + `beta` (λ) · the odds-ratio term. Refusals as `CPOTrainer`'s."""

    _kind, _config_class = "ORPO", ORPOConfig
    _tag_names = ["prefopt", "orpo"]
    _name = "ORPO"
