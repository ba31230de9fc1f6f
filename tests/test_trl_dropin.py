"""prefopt.trl against TRL 1.16 itself: the same script body, run once with TRL's experimental
CPOTrainer/ORPOTrainer and once with prefopt's drop-in, from the same tiny model, tokenizer, data
and seed, gives the same first step (loss, grad_norm, every metric TRL logs but `logits/*`, which
TRL averages over prompt and padding positions too); and the drop-in's own behaviour: dataset
forms, train/evaluate/save, a subclass, PEFT, the refusals, and the config's fields and defaults.

Tolerances: one step from the same weights on the same pairs, summed in another order (prefopt's
packed rows and chunked head against TRL's padded batch): `helpers.ROUND_OFF_REL`, derived there.
"""

import contextlib
import copy
import dataclasses
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import trl.experimental.cpo as trl_cpo  # noqa: E402
import trl.experimental.orpo as trl_orpo  # noqa: E402

import prefopt.trl as ours  # noqa: E402
from helpers import ROUND_OFF_REL, assert_logged_close  # noqa: E402
from prefopt.demo import make_rows, task_corpus  # noqa: E402
from prefopt.errors import PrefoptError  # noqa: E402
from prefopt.tiny import save_tiny, tiny_model, train_tokenizer  # noqa: E402

IMPLS = {"trl": {"CPO": (trl_cpo.CPOConfig, trl_cpo.CPOTrainer), "ORPO": (trl_orpo.ORPOConfig, trl_orpo.ORPOTrainer)},
         "prefopt": {"CPO": (ours.CPOConfig, ours.CPOTrainer), "ORPO": (ours.ORPOConfig, ours.ORPOTrainer)}}
# what a CPU test run sets; everything else stays each config's default
RUN = dict(use_cpu=True, bf16=False, per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1,
           save_strategy="no", report_to="none", learning_rate=1e-3, max_steps=1)
EXTRA_METRICS = {"lengths/chosen", "lengths/rejected"}  # prefopt's, beyond TRL's names


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(task_corpus(), vocab_size=300)  # ChatML template, own pad, BOS and EOS


def rows(form: str, n: int = 8, seed: int = 1) -> list[dict]:
    if form == "plain":
        return make_rows(n, seed)
    chat = make_rows(n, seed, chat=True)
    if form == "implicit":  # whole conversations only: the prompt is what chosen and rejected share
        return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat]
    return chat


def script(Config, Trainer, tokenizer, out, train_rows, eval_rows=None, model=None, trainer_kwargs=None, **keys):
    """A TRL user's script body; only the classes it is given change."""
    model = tiny_model("llama", tokenizer, seed=0) if model is None else model
    args = Config(output_dir=str(out), **{**RUN, **keys})
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                      processing_class=copy.deepcopy(tokenizer), **(trainer_kwargs or {}))
    trainer.train()
    return trainer


def first_steps(kind, tokenizer, tmp_path, train_rows, **keys):
    lines = {}
    for impl in ("trl", "prefopt"):
        trainer = script(*IMPLS[impl][kind], tokenizer, tmp_path / impl, train_rows, **keys)
        lines[impl] = trainer.state.log_history[0]
    return lines["trl"], lines["prefopt"]


def assert_same_step(theirs: dict, mine: dict):
    assert mine["loss"] == pytest.approx(theirs["loss"], rel=ROUND_OFF_REL)
    assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=ROUND_OFF_REL)
    assert set(mine) == set(theirs) | EXTRA_METRICS  # TRL's names, and only lengths/* besides
    compared = [k for k in theirs if "/" in k and not k.startswith("logits/") or k == "nll_loss"]
    assert len(compared) >= 7
    assert_logged_close(theirs, mine, compared, ROUND_OFF_REL)
    assert (mine["learning_rate"], mine["epoch"], mine["step"]) == (theirs["learning_rate"], theirs["epoch"],
                                                                    theirs["step"])


CASES = {
    "cpo-sigmoid": ("CPO", {}),  # every CPOConfig default: loss_type sigmoid, cpo_alpha 1.0
    "cpo-hinge-smoothing-ignored": ("CPO", dict(loss_type="hinge", beta=0.3, label_smoothing=0.2)),
    "simpo-trl-default-cpo-alpha": ("CPO", dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0)),  # CPO-SimPO
    "simpo-smoothed": ("CPO", dict(loss_type="simpo", beta=2.5, simpo_gamma=0.7, cpo_alpha=0.0, label_smoothing=0.1)),
    "alphapo": ("CPO", dict(loss_type="alphapo", beta=2.0, simpo_gamma=1.0, alpha=0.25)),
    "orpo": ("ORPO", {}),
    "orpo-strong": ("ORPO", dict(beta=1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_step_equals_trl(case, tokenizer, tmp_path):
    kind, keys = CASES[case]
    with pytest.warns(UserWarning, match="label smoothing") if "ignored" in case else contextlib.nullcontext():
        theirs, mine = first_steps(kind, tokenizer, tmp_path, rows("plain"), **keys)
    assert_same_step(theirs, mine)


@pytest.mark.parametrize("form", ["plain", "chat", "implicit"])
@pytest.mark.parametrize("kind", ["CPO", "ORPO"])
def test_dataset_forms_train_as_trl(form, kind, tokenizer, tmp_path):
    theirs, mine = first_steps(kind, tokenizer, tmp_path, rows(form), loss_type="simpo") if kind == "CPO" else \
        first_steps(kind, tokenizer, tmp_path, rows(form))
    assert_same_step(theirs, mine)


@pytest.mark.parametrize("kind", ["CPO", "ORPO"])
def test_a_template_whose_turn_end_is_the_eos_trains_as_trl(kind, tmp_path):
    """ChatML with <|im_end|> as EOS (Qwen chat models): TRL trains the template's EOS, newline and
    its own EOS; `prefopt train` ends the completion at the first EOS, the drop-in trains TRL's ids."""
    tok = train_tokenizer(task_corpus(), vocab_size=300)
    tok.eos_token = "<|im_end|>"
    keys = dict(loss_type="simpo") if kind == "CPO" else {}
    theirs, mine = first_steps(kind, tok, tmp_path, rows("chat"), **keys)
    assert_same_step(theirs, mine)


def test_evaluate_and_compute_metrics_as_trl(tokenizer, tmp_path):
    """One evaluation batch of 4 pairs: eval_loss and the metrics TRL logs; compute_metrics gets TRL's
    predictions (a mean chosen and rejected logit per batch) and its result is logged."""
    seen = {}

    def compute_metrics(prediction):
        seen.setdefault("shapes", []).append(prediction.predictions.shape)
        return {"batches": len(prediction.predictions) / 2}

    results = {}
    for impl in ("trl", "prefopt"):
        trainer = script(*IMPLS[impl]["CPO"], tokenizer, tmp_path / impl, rows("plain"), rows("plain", 4, seed=7),
                         trainer_kwargs=dict(compute_metrics=compute_metrics))
        results[impl] = trainer.evaluate()
    theirs, mine = results["trl"], results["prefopt"]
    assert seen["shapes"] == [(2,), (2,)]
    assert mine["eval_batches"] == theirs["eval_batches"] == 1
    assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=ROUND_OFF_REL)
    compared = [k for k in theirs if "/" in k and "logits/" not in k] + ["eval_nll_loss"]
    assert len(compared) >= 7
    assert_logged_close(theirs, mine, compared, ROUND_OFF_REL)


def test_train_evaluate_save_from_a_model_id(tokenizer, tmp_path):
    """A model given by folder, no processing_class (its tokenizer is loaded from there), evaluation
    during training, then evaluate(), save_model(dir): a model and tokenizer that load."""
    folder = save_tiny(tiny_model("llama", tokenizer, seed=0), tokenizer, tmp_path / "model")
    args = ours.ORPOConfig(output_dir=str(tmp_path / "run"), **{**RUN, "max_steps": 3}, eval_strategy="steps",
                           eval_steps=2)
    trainer = ours.ORPOTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows("chat")),
                               eval_dataset=Dataset.from_list(rows("chat", 4, seed=9)))
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_log_odds_ratio", "eval_log_odds_chosen"} <= set(metrics)
    history = trainer.state.log_history
    train_lines = [line for line in history if "loss" in line]
    eval_lines = [line for line in history if "eval_loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3] and [line["step"] for line in eval_lines] == [2, 3, 3]
    trl_names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"}
    assert trl_names <= set(train_lines[0]) and {f"eval_{n}" for n in trl_names} <= set(eval_lines[0])
    trainer.save_model(str(tmp_path / "saved"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved_tokenizer("Sort: 3 1 2")["input_ids"] == tokenizer("Sort: 3 1 2")["input_ids"]
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert not torch.equal(trained["model.embed_tokens.weight"],
                           AutoModelForCausalLM.from_pretrained(folder).state_dict()["model.embed_tokens.weight"])


def subclass_of(base):
    """A subclass as axolotl writes them (a scheduler mixin, tags) that also overrides compute_loss to
    scale and record it and logs a metric of its own through store_metrics."""

    class Scaled(base):
        tag_names = ["axolotl", "cpo"]
        calls = 0

        def create_scheduler(self, num_training_steps, optimizer=None):
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda step: 0.5)
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            type(self).calls += 1
            loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            self.store_metrics({"custom/scaled": 1.0}, train_eval="train")
            return 0.5 * loss

    return Scaled


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps, self.logged = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def test_subclass_overriding_compute_loss_behaves_as_on_trl(tokenizer, tmp_path):
    lines, recorders, plain = {}, {}, {}
    for impl in ("trl", "prefopt"):
        Config, Trainer = IMPLS[impl]["CPO"]
        Scaled = subclass_of(Trainer)
        model = tiny_model("llama", tokenizer, seed=0)
        args = Config(output_dir=str(tmp_path / impl), **{**RUN, "max_steps": 2})
        trainer = Scaled(model=model, args=args, train_dataset=Dataset.from_list(rows("plain")),
                         processing_class=copy.deepcopy(tokenizer))
        recorders[impl] = StepRecorder()
        trainer.add_callback(recorders[impl])
        trainer.train()
        assert Scaled.calls == 2  # once per micro-batch, every step
        lines[impl] = trainer.state.log_history
        plain[impl] = script(Config, Trainer, tokenizer, tmp_path / f"{impl}-plain", rows("plain")).state.log_history
    for impl, history in lines.items():
        first = history[0]
        assert first["learning_rate"] == pytest.approx(0.5e-3)  # the overridden scheduler
        assert first["custom/scaled"] == 1.0
        # what compute_loss returned is what was optimized: the loss and its gradient halved
        assert first["loss"] == pytest.approx(0.5 * plain[impl][0]["loss"], rel=ROUND_OFF_REL)
        assert first["grad_norm"] == pytest.approx(0.5 * plain[impl][0]["grad_norm"], rel=ROUND_OFF_REL)
        assert recorders[impl].steps == [1, 2] and len(recorders[impl].logged) == 3  # 2 steps + the summary
    assert_same_step({k: v for k, v in lines["trl"][0].items()},
                     {k: v for k, v in lines["prefopt"][0].items()})
    for step in (0, 1):
        assert lines["prefopt"][step]["loss"] == pytest.approx(lines["trl"][step]["loss"], rel=1e-4)


def test_peft_config_trains_only_the_adapter(tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, task_type="CAUSAL_LM")
    first = {}
    for impl in ("trl", "prefopt"):
        trainer = script(*IMPLS[impl]["CPO"], tokenizer, tmp_path / impl, rows("plain"),
                         trainer_kwargs=dict(peft_config=copy.deepcopy(lora)))
        first[impl] = trainer.state.log_history[0]
    model = trainer.model
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # LoRA's too, as TRL
    assert_same_step(first["trl"], first["prefopt"])  # the same seeded adapter, the same step
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


class OverridesTRLInternals(ours.CPOTrainer):
    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        raise AssertionError("never called")


REFUSALS = {
    "data_collator": dict(data_collator=lambda features: features),
    "model_init": dict(model_init=lambda: None),
    "preprocess_logits_for_metrics": dict(preprocess_logits_for_metrics=lambda logits, labels: logits),
    "eval_dataset": dict(eval_dataset={"a": Dataset.from_list(make_rows(4, 2)),
                                       "b": Dataset.from_list(make_rows(4, 3))}),
    "is_encoder_decoder": dict(args_keys=dict(is_encoder_decoder=True)),
    "model_init_kwargs": dict(args_keys=dict(model_init_kwargs={"dtype": "float32"})),
    "use_liger_kernel": dict(args_keys=dict(use_liger_kernel=True)),
    "train_dataset is required": dict(train_dataset=None),
    "rejected": dict(train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b"}])),
    "peft_config": dict(peft_config={"r": 8}),
    "not a CPOConfig": dict(args=TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")),
    "ORPOConfig, not a CPOConfig": dict(args=ours.ORPOConfig(output_dir="unused", **RUN)),
    "OverridesTRLInternals.get_batch_loss_metrics": dict(cls=OverridesTRLInternals),
}


@pytest.mark.parametrize("named", sorted(REFUSALS))
def test_what_prefopt_cannot_honour_is_refused_by_name(named, tokenizer, tmp_path):
    given = dict(REFUSALS[named])
    cls = given.pop("cls", ours.CPOTrainer)
    args = given.pop("args", None) or ours.CPOConfig(output_dir=str(tmp_path), **RUN, **given.pop("args_keys", {}))
    kwargs = dict(model=tiny_model("llama", tokenizer, seed=0), args=args,
                  train_dataset=Dataset.from_list(make_rows(8, 1)), processing_class=copy.deepcopy(tokenizer))
    with pytest.raises(PrefoptError) as e:
        cls(**{**kwargs, **given})
    assert named in str(e.value)


@pytest.mark.parametrize("kind, keys", [("CPO", {}), ("CPO", {"loss_type": "alphapo"}), ("ORPO", {}),
                                        ("CPO", {"fp16": False, "gradient_checkpointing": False}),
                                        ("ORPO", {"fp16": False, "gradient_checkpointing": False})])
def test_config_fields_and_defaults_are_trls(kind, keys, tmp_path):
    theirs_cls, mine_cls = IMPLS["trl"][kind][0], IMPLS["prefopt"][kind][0]
    theirs, mine = (c(output_dir=str(tmp_path), use_cpu=True, **keys) for c in (theirs_cls, mine_cls))
    names = [f.name for f in dataclasses.fields(theirs_cls)]
    assert set(names) <= {f.name for f in dataclasses.fields(mine_cls)}
    differ = {n: (getattr(theirs, n), getattr(mine, n)) for n in names
              if n not in ("logging_dir",) and getattr(theirs, n) != getattr(mine, n)}
    assert not differ
    assert mine.learning_rate == 1e-6 and mine.logging_steps == 10 and mine.bf16 and mine.activation_checkpointing \
        is (keys.get("gradient_checkpointing", True))


def test_explain_says_what_cpo_alpha_trains(tokenizer, tmp_path):
    trainer = ours.CPOTrainer(model=tiny_model("llama", tokenizer, seed=0),
                              args=ours.CPOConfig(output_dir=str(tmp_path), **RUN, loss_type="simpo", beta=2.0),
                              train_dataset=Dataset.from_list(make_rows(8, 1)), processing_class=tokenizer)
    text = trainer.explain()
    assert "cpo_simpo" in text and "CPO-SimPO" in text and "cpo_alpha=0.0" in text
    assert "train_dataset[8 rows]" in text and "LlamaForCausalLM" in text and "(built-in demo)" not in text
    assert trainer.prefopt_config.objective.nll_weight == 1.0
    assert trainer.prefopt_config.objective.gamma_beta_ratio == pytest.approx(0.5 / 2.0)


def test_checkpoints_resume_to_the_same_steps(tokenizer, tmp_path):
    """save_steps checkpoints are prefopt's complete ones; train(resume_from_checkpoint=...) continues
    the very run: steps 3 and 4 and the whole run's train_loss as without the interruption (the same
    arithmetic on the same weights, optimizer state and batches: exact)."""
    keys = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    whole = script(ours.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path / "run", rows("plain"), **keys)
    assert (tmp_path / "run" / "checkpoint-2" / "prefopt_checkpoint_complete").is_file()
    args = ours.CPOConfig(output_dir=str(tmp_path / "run"), **{**RUN, **keys})
    resumed = ours.CPOTrainer(model=tiny_model("llama", tokenizer, seed=0), args=args,
                              train_dataset=Dataset.from_list(rows("plain")), processing_class=copy.deepcopy(tokenizer))
    steps = StepRecorder()
    resumed.add_callback(steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert steps.steps == [3, 4]  # only what the checkpoint had not done
    before = {line["step"]: line for line in whole.state.log_history if "loss" in line}
    after = {line["step"]: line for line in resumed.state.log_history if "loss" in line}
    assert sorted(after) == [1, 2, 3, 4]  # 1 and 2 as the checkpoint recorded them
    for step in (3, 4):
        assert {k: after[step][k] for k in ("loss", "grad_norm", "rewards/margins")} == \
            {k: before[step][k] for k in ("loss", "grad_norm", "rewards/margins")}
    totals = [t.state.log_history[-1]["train_loss"] for t in (whole, resumed)]
    assert totals[1] == pytest.approx(totals[0], rel=ROUND_OFF_REL)
    with pytest.raises(PrefoptError, match="holds no checkpoint"):
        script(ours.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path / "empty", rows("plain"),
               trainer_kwargs=None).train(resume_from_checkpoint=True)


class FakeHub:
    """transformers' `hf_api()` as push_to_hub uses it, recording instead of uploading (no network)."""

    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        self.uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return "commit"


def test_push_to_hub_uploads_the_model_tokenizer_and_card(tokenizer, tmp_path, monkeypatch):
    """The Trainer's own push_to_hub, up to the HTTP call: the output folder it uploads holds the model,
    the tokenizer and a model card tagged prefopt and cpo."""
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer = script(ours.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path / "tiny-cpo", rows("plain"))
    trainer.push_to_hub()
    assert hub.created == ["tiny-cpo"]
    (repo, files), = hub.uploads
    assert repo == "user/tiny-cpo"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    card = (tmp_path / "tiny-cpo" / "README.md").read_text()
    assert "prefopt" in card and "cpo" in card


def test_generate_during_eval_writes_prefopts_generations(tokenizer, tmp_path):
    trainer = script(ours.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path, rows("chat"), rows("chat", 4, seed=9),
                     generate_during_eval=True)
    trainer.evaluate()
    lines = (tmp_path / "eval_generations.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one per distinct held-out prompt (eval_generation_prompts' default 4)


def test_trls_own_config_object_is_read_as_ours(tokenizer, tmp_path):
    """A script that changed only the trainer's import still hands over TRL's CPOConfig: read alike."""
    keys = dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    theirs = script(trl_cpo.CPOConfig, trl_cpo.CPOTrainer, tokenizer, tmp_path / "trl", rows("plain"), **keys)
    mine = script(trl_cpo.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path / "ours", rows("plain"), **keys)
    assert mine.prefopt_config.objective.method == "cpo_simpo"
    assert_same_step(theirs.state.log_history[0], mine.state.log_history[0])


def test_callbacks_and_optimizers_arguments_are_the_trainers(tokenizer, tmp_path):
    """`callbacks=[...]` are called, `optimizers=(optimizer, scheduler)` are the ones stepped: the logged
    learning rate is the given scheduler's, and the first step is TRL's with the same pair."""
    first = {}
    for impl in ("trl", "prefopt"):
        model = tiny_model("llama", tokenizer, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.25)
        recorder = StepRecorder()
        trainer = script(*IMPLS[impl]["CPO"], tokenizer, tmp_path / impl, rows("plain"), model=model,
                         trainer_kwargs=dict(callbacks=[recorder], optimizers=(optimizer, scheduler)), max_steps=2)
        assert recorder.steps == [1, 2]
        assert trainer.optimizer.optimizer is optimizer and trainer.lr_scheduler is scheduler
        first[impl] = trainer.state.log_history[0]
        assert first[impl]["learning_rate"] == pytest.approx(0.025)
    assert_same_step(first["trl"], first["prefopt"])


def test_pairs_that_teach_nothing_are_dropped_counted_and_refused_past_the_share(tokenizer, tmp_path):
    """Unlike TRL, repeated pairs are dropped (and counted in `data_report`); past max_dropped_share
    (prefopt's key on the config) the trainer is refused, naming the dataset and the key."""
    data = rows("plain", 8) + rows("plain", 2)  # the first two rows again: 2 of 10 dropped
    with pytest.raises(PrefoptError, match=r"train_dataset.*max_dropped_share \(now 0.1\)"):
        script(ours.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path / "a", data)
    trainer = script(ours.CPOConfig, ours.CPOTrainer, tokenizer, tmp_path / "b", data, max_dropped_share=0.25)
    assert len(trainer.train_dataset) == 8 and trainer.data_report["train"]["dropped"]["duplicate_pair"] == 2


def test_a_bad_row_is_named(tokenizer, tmp_path):
    data = rows("chat", 4)
    data[2]["chosen"] = [{"role": "user", "content": "not an answer"}]
    with pytest.raises(PrefoptError, match="train_dataset row 2"):
        script(ours.ORPOConfig, ours.ORPOTrainer, tokenizer, tmp_path, data)


@pytest.mark.parametrize("kwargs", [{"load_in_4bit": True}, {"quantization_config": {"load_in_4bit": True}}])
def test_a_quantized_load_by_id_is_refused_with_a_fix_the_drop_in_can_take(kwargs, tokenizer, tmp_path):
    """prefopt's own keys for it (load_in_4bit, ...) are not fields of TRL's config: the refusal names
    what a TRL script can do instead, before anything loads."""
    args = ours.CPOConfig(output_dir=str(tmp_path), **RUN, model_init_kwargs=kwargs)
    with pytest.raises(PrefoptError, match=r"model_init_kwargs\.(load_in_4bit|quantization_config): the drop-in does "
                                           r"not quantize a model given by id; load it with from_pretrained"):
        ours.CPOTrainer(model=str(tmp_path / "never-loaded"), args=args, processing_class=copy.deepcopy(tokenizer),
                        train_dataset=Dataset.from_list(make_rows(8, 1)))
