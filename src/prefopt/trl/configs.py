"""`CPOConfig` and `ORPOConfig`: TRL 1.16's experimental configs, field for field and default for default.

    args = CPOConfig(output_dir="runs/a", loss_type="simpo", beta=2.0, simpo_gamma=1.0)

They are `transformers.TrainingArguments` with TRL's own fields, and TRL's overrides of the
Trainer's defaults: `learning_rate` 1e-6, `logging_steps` 10, `gradient_checkpointing` on, `bf16`
on unless `fp16` is set. Two keys are prefopt's own, after TRL's: `layout` (how a micro-batch's
pairs share a forward pass; it changes no number, only the cost) and `max_dropped_share` (the
share of a dataset's pairs that may be dropped as unable to teach anything before training is
refused). `CPOTrainer` and `ORPOTrainer` read them as `prefopt.trl.translate` says.
"""

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..errors import PrefoptError


@dataclass
class _TRLBase(TrainingArguments):
    """TRL's `_BaseConfig` defaults, and the fields both of TRL's configs share."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps (TRL's default 10)."})
    # None here and on in __post_init__, as TRL's True, without transformers' warning for the old name
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Activation checkpointing (TRL's default: on); alias of "
                                        "activation_checkpointing."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (None: on unless fp16 is set)."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Arguments of the scheduler."})
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum prompt + completion tokens (None: 512, as TRL)."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "TRL uses it for encoder-decoder models only; ignored here as there."})
    disable_dropout: bool = field(default=True, metadata={"help": "Whether to disable dropout in the model."})
    generate_during_eval: bool = field(
        default=False, metadata={"help": "At each evaluation, greedy answers to the first held-out prompts "
                                         "(prefopt's eval_generations.jsonl, and a table to W&B)."})
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "prefopt trains decoder-only models: True is refused."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when the model is given by id."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code shipped with a Hub repository."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes to use for processing the dataset."})
    # prefopt's own
    layout: str = field(
        default="packed", metadata={"help": "prefopt: packed (default), shared or padded; the same numbers at "
                                            "another cost (packed: each prompt computed once)."})
    max_dropped_share: float = field(
        default=0.1, metadata={"help": "prefopt: refuse a dataset with more than this share of pairs that teach "
                                       "nothing (blank, cut to nothing, chosen = rejected, repeated); 1: never."})

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            self.activation_checkpointing = True
        try:
            super().__post_init__()
        except ValueError as e:  # transformers' own check of the arguments, e.g. bf16 on a CPU-only machine
            raise PrefoptError(f"{type(self).__name__}: {e}") from None


@dataclass
class CPOConfig(_TRLBase):
    """TRL 1.16's `CPOConfig`: the `CPOTrainer`'s arguments (`TrainingArguments` plus CPO's fields).

    `loss_type`: sigmoid, hinge or ipo (CPO, with the NLL term `cpo_alpha`), simpo (SimPO's loss
    with margin `simpo_gamma`, absolute, and the NLL term `cpo_alpha`), alphapo (simpo with
    `cpo_alpha` 0, set here as TRL does). `cpo_alpha` defaults to 1.0, TRL's default, also for
    `loss_type="simpo"`: that trains CPO-SimPO (SimPO plus an NLL term of weight 1), not the SimPO
    paper's objective, which has no NLL term; set `cpo_alpha=0.0` for SimPO itself. `alpha`:
    AlphaPO's reward shape, with every loss type.
    """

    beta: float = field(default=0.1, metadata={"help": "β: the reward scale."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing factor (sigmoid and simpo)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid, hinge, ipo, simpo or alphapo.",
                                                        "choices": ["sigmoid", "hinge", "ipo", "simpo", "alphapo"]})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL (behaviour cloning) term."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target margin γ (absolute), loss_type simpo."})
    alpha: float = field(default=0.0, metadata={"help": "AlphaPO's reward shape (0: log-probability rewards)."})

    def __post_init__(self):
        if self.loss_type == "alphapo":  # TRL's shorthand: SimPO's loss without the NLL term
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        super().__post_init__()


@dataclass
class ORPOConfig(_TRLBase):
    """TRL 1.16's `ORPOConfig`: the `ORPOTrainer`'s arguments. `beta` is the paper's λ, the weight
    of the odds-ratio term; the NLL term over prompt and chosen completion has weight 1."""

    beta: float = field(default=0.1, metadata={"help": "λ: the weight of the odds-ratio term."})
    padding_value: int | None = field(
        default=None, metadata={"help": "Accepted and unused: masks come from sequence lengths, not pad ids."})
