"""The training step: gradient-accumulation invariance through the real Trainer loop, metrics
reduced as sums and counts, metrics.jsonl, and evaluation metrics."""

import json

import pytest
import torch

from helpers import (ROUND_OFF_REL, U, assert_grads_close, assert_logged_close, make_trainer, random_pairs,
                     tiny_random_model)
from prefopt.trainer import MetricsFile


def one_step(tmp_path, keys, batch, accumulation, pairs):
    model = tiny_random_model("llama", seed=1)
    trainer = make_trainer(
        model, keys, tmp_path / f"b{batch}x{accumulation}", pairs,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, seed=7,
    )
    trainer.train()
    logged = next(line for line in trainer.state.log_history if "loss" in line)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, logged


@pytest.mark.parametrize("keys", [
    {"method": "cpo_simpo"},  # mean log-probs + an NLL term whose token count differs per micro-batch
    {"method": "orpo"},  # NLL over prompt + completion
    {"method": "cpo", "loss_type": "sigmoid"},  # summed log-probs
    {"method": "simpo", "diversity_weight": 0.5, "diversity_alpha": 0.3},  # entropy and KL means over the step
])
def test_gradient_accumulation_invariance(tmp_path, keys):
    pairs = random_pairs(8, seed=11, max_completion=12)
    initial = {n: p.detach() for n, p in tiny_random_model("llama", seed=1).named_parameters()}
    reference, ref_log = one_step(tmp_path, keys, 8, 1, pairs)
    for batch, accumulation in [(4, 2), (2, 4)]:
        weights, logged = one_step(tmp_path, keys, batch, accumulation, pairs)
        # the same step summed over other micro-batches (tests/helpers.py: ROUND_OFF_REL): the loss and
        # the log-probs are of the size of their terms; a margin is relative to the rewards it subtracts
        assert logged["loss"] == pytest.approx(ref_log["loss"], rel=ROUND_OFF_REL)
        names = ("rewards/accuracies", "rewards/chosen", "logps/chosen", "nll_loss", "rewards/margins")
        assert_logged_close(ref_log, logged, names, ROUND_OFF_REL)
        for name, w in weights.items():
            # one SGD step of lr 0.5, unclipped: w = w0 − 0.5·g, rounded once in each run (2u·|w|). So
            # this compares the step's gradients, to ROUND_OFF_REL of the tensor's largest step, as
            # helpers.assert_grads_close does
            step = (reference[name] - initial[name]).abs().max().item()
            torch.testing.assert_close(w, reference[name], rtol=2 * U, atol=ROUND_OFF_REL * step,
                                       msg=f"{name} at {batch}x{accumulation}")
    # and the step did move the weights (the comparison above is not vacuous)
    assert max((reference[n] - initial[n]).abs().max().item() for n in initial) > 1e-4


def test_metrics_file_and_eval_metrics(tmp_path):
    trainer = make_trainer(tiny_random_model("qwen2"), {"method": "simpo"}, tmp_path, random_pairs(6, seed=2),
                           eval_pairs=random_pairs(4, seed=9), callbacks=[MetricsFile(tmp_path / "m.jsonl")],
                           per_device_train_batch_size=2, per_device_eval_batch_size=3, max_steps=3,
                           eval_strategy="steps", eval_steps=2)
    trainer.train()
    lines = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    eval_lines = [l for l in lines if "eval_loss" in l]
    assert [l["step"] for l in train_lines] == [1, 2, 3]
    for l in train_lines:
        assert {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/accuracies", "logps/rejected",
                "logits/chosen", "nll_loss"} <= l.keys()
        assert 0.0 <= l["rewards/accuracies"] <= 1.0
        # SimPO rewards are β·mean log p, and β = 2 scales every sum exactly (a power of two)
        assert l["rewards/chosen"] == 2.0 * l["logps/chosen"]
    assert [l["step"] for l in eval_lines] == [2, 3]  # every eval_steps, and at the end
    assert {"eval_rewards/margins", "eval_logps/chosen", "eval_rewards/accuracies"} <= eval_lines[0].keys()
    # the eval metrics cover exactly the 4 eval pairs: accuracy is a count over 4, exact in binary
    assert eval_lines[0]["eval_rewards/accuracies"] * 4 in {0, 1, 2, 3, 4}


def test_token_balanced_micro_batches_keep_the_pairs_per_step(tmp_path):
    """train_sampling_strategy: batch_rebalance (transformers' sampler, fed our `length` column):
    micro-batches vary in pair count by token cost, every optimizer step still sees
    batch × accumulation pairs, and the loss is normalised by exactly those pairs."""
    pairs = random_pairs(16, seed=3, max_prompt=20, max_completion=20)
    for p in pairs:
        p["length"] = len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
    seen = []
    trainer = make_trainer(tiny_random_model("llama"), {"method": "simpo"}, tmp_path, pairs, layout="packed",
                           per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                           train_sampling_strategy="batch_rebalance")
    original = trainer.get_batch_samples

    def spy(*args):
        batches, counts = original(*args)
        seen.append(([len(b["row"]) for b in batches], int(counts.pairs)))
        return batches, counts

    trainer.get_batch_samples = spy
    trainer.train()
    assert [total for _, total in seen] == [8, 8]
    assert all(sum(sizes) == 8 for sizes, _ in seen)
    assert any(len(set(sizes)) > 1 for sizes, _ in seen)  # sizes follow token cost, not a fixed count


def step_through(model, trainer, scorer, batch) -> tuple:
    """One step's loss, gradients and logged means through `scorer`, from the model's weights."""
    from prefopt.metrics import MetricSums
    from prefopt.step import loss, score

    scores = score(model, batch, scorer)
    step = loss(scores, trainer.step_objective)
    step.loss.backward()
    sums = MetricSums()
    sums.record("train", step, scores)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return step.loss.detach(), grads, sums.means("train", lambda t: t, "cpu")


@pytest.mark.parametrize("method", ["cpo_simpo", "orpo"])
def test_keeping_the_heads_softmax_for_backward_equals_recomputing_it(tmp_path, method):
    """`logprob_keep_mb` changes where backward reads each row's softmax from — kept from forward,
    or recomputed from the logits — not what it is: a whole step's loss, metrics and gradients agree
    to round-off (the two forms normalise in another order: exp(z − max)/Σ against exp(z − lse))
    with every row recomputed, 5 of them kept (a part, across chunks of 4), every one kept."""
    import dataclasses

    from prefopt.scoring import FusedHead

    results = []
    for keep in (0, 5, 10**6):
        model = tiny_random_model("llama", seed=5)
        trainer = make_trainer(model, {"method": method}, tmp_path / str(keep), layout="packed")
        scorer = trainer.scorer(model)
        assert isinstance(scorer, FusedHead) and scorer.keep > 100  # the default budget keeps every row here
        scorer = dataclasses.replace(scorer, keep=keep, chunk=4)
        batch = trainer.data_collator([dict(p) for p in random_pairs(5, seed=6)])
        assert batch["score_index"].numel() > 10
        results.append(step_through(model, trainer, scorer, batch))
    l0, g0, m0 = results[0]
    assert len(g0) > 5
    for lk, gk, mk in results[1:]:
        assert lk.item() == pytest.approx(l0.item(), rel=ROUND_OFF_REL)
        assert_grads_close(gk, g0)
        assert_logged_close(m0, mk, m0.keys(), ROUND_OFF_REL)


@pytest.mark.parametrize("arch, layout", [("llama", "packed"), ("qwen2", "padded"), ("gemma2", "shared")])
def test_scoring_through_the_models_own_head_equals_the_chunked_head(tmp_path, arch, layout):
    """Under FSDP a tied head is scored through the model's own head call (`scoring.OwnHead`):
    same loss, metrics and gradients as the chunked head path, soft-capping included (gemma2)."""
    from prefopt.scoring import OwnHead, choose_scorer
    from prefopt.tiny import tiny_model

    results = []
    for in_forward in (False, True):
        model = tiny_random_model(arch, seed=3) if arch != "gemma2" else tiny_model("gemma2", 101, seed=3)
        trainer = make_trainer(model, {"method": "cpo_simpo"}, tmp_path / str(in_forward), layout=layout)
        scorer = choose_scorer(model, fsdp=False, tied_under_fsdp=in_forward, diversity=False)
        assert isinstance(scorer, OwnHead) == in_forward
        batch = trainer.data_collator([dict(p) for p in random_pairs(5, seed=4)])
        results.append(step_through(model, trainer, scorer, batch))
    (l0, g0, m0), (l1, g1, m1) = results
    # one step on the same weights, the head's sums in another order (tests/helpers.py: ROUND_OFF_REL)
    assert l1.item() == pytest.approx(l0.item(), rel=ROUND_OFF_REL)
    assert len(g0) > 5
    assert_grads_close(g1, g0)
    assert_logged_close(m0, m1, m0.keys(), ROUND_OFF_REL)


def test_prompt_tokens_enter_the_nll_only_where_the_method_spans_the_prompt(tmp_path):
    """A collator that scores the prompt's tokens too changes nothing for an NLL over the chosen
    completion (cpo_simpo); ORPO's NLL spans them."""
    from prefopt.collate import PaddedCollator
    from prefopt.step import loss, score

    pairs = [dict(p) for p in random_pairs(4, seed=5)]
    nll = {}
    for method in ("cpo_simpo", "orpo"):
        model = tiny_random_model("llama", seed=1)
        trainer = make_trainer(model, {"method": method}, tmp_path / method)
        for with_prompt in (False, True):
            batch = PaddedCollator(pad_token_id=0, score_prompt=with_prompt)(pairs)
            step = loss(score(model, batch, trainer.scorer(model)), trainer.step_objective)
            nll[method, with_prompt] = (step.nll.item(), int(step.nll_tokens))
    assert nll["cpo_simpo", True] == nll["cpo_simpo", False]
    completion_tokens = sum(len(p["chosen_ids"]) for p in pairs)
    prompt_tokens = sum(len(p["prompt_ids"]) - 1 for p in pairs)  # the first prompt token is never predicted
    assert nll["orpo", False][1] == completion_tokens
    assert nll["orpo", True][1] == completion_tokens + prompt_tokens
