"""bf16 layouts: the shared and packed layouts' sequence log-probs, loss and gradients under bf16
(bf16 weights, or fp32 weights under CPU autocast) are as close to the fp32 truth as the padded
layout's own bf16 result, and padded's own error is within a budget of bf16 roundings.
"""

import copy

import pytest
import torch

import prefopt.scoring
from bf16_helpers import SAFETY, assert_within, hidden_budget, logit_error, logp_error
from helpers import make_trainer, random_pairs
from prefopt.attention import install_segmented_sdpa, model_inputs
from prefopt.collate import collator_for
from prefopt.config import build_config
from prefopt.gradahead import ahead_scores
from prefopt.logprobs import head_transform, per_sequence, token_logps
from prefopt.tiny import tiny_model
from test_layouts import ARCH_ATTN

# Here the reference is the fp32 forward of the same weights (a bf16 model upcast exactly), and the
# bf16 layouts do different arithmetic from padded: other attention shapes and reduction orders, so
# other roundings. No a-priori bound on a transformer's bf16 error is tight enough to catch a wrong
# mask, so the criterion is relative: each layout's bf16 result is as close to the fp32 truth as
# padded's own bf16 result, within a factor PADDED_FACTOR. Two correct bf16 evaluations of one
# quantity have errors of one distribution; the factor covers the spread of their maxima (worst ratio
# seen: 1.1 for sequence log-probs, 1.53 for a parameter's gradient, over 4 seeds × these 7 models ×
# 2 methods × 2 weight dtypes), while a mask that lets rejected tokens see chosen ones puts sequence
# log-probs 16–130 times padded's error off (asserted below). Padded's own error is anchored
# separately: the final hidden states within a budget of bf16 roundings, and each log-prob within
# what those hidden states explain through the head.
PADDED_FACTOR = 2


def bf16_model(arch: str, attn: str, weights: str):
    """The model to run under autocast, and its fp32 reference (the same weights, exactly)."""
    model = tiny_model(arch, 101, attn_implementation=attn)
    if weights == "bfloat16":
        model = model.bfloat16()
    return model, copy.deepcopy(model).float()


def forward_scores(model, batch, autocast: bool):
    """Per-token log-probs and final hidden states at the scored positions, as training computes
    them: the forward under CPU autocast, its outputs in fp32, the head outside autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"], **model_inputs(batch, model.config, model.dtype),
                    output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1].float()
    tok = token_logps(hidden, batch["score_index"], batch["score_target"], model.get_output_embeddings(),
                      head_transform(model.config), 64)
    return tok.logps.detach(), hidden.reshape(-1, hidden.shape[-1])[batch["score_index"]].detach()


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_sequence_logps_under_bf16_are_as_close_to_fp32_as_padded(arch, attn, weights, tmp_path):
    install_segmented_sdpa()  # as the pipeline does for packed rows on SDPA
    pairs = random_pairs(6, seed=4, max_prompt=14, max_completion=14)  # longer than the sliding window
    model, reference_model = bf16_model(arch, attn, weights)
    cfg = build_config({"method": "orpo", "output_dir": str(tmp_path)})  # prompt tokens scored too

    def sequences(logps, batch):
        return per_sequence(logps.double(), batch["score_seq"], torch.ones_like(batch["score_is_completion"]), 12)[0]

    padded = collator_for(cfg, 0, "padded")(pairs)
    true_logps, true_h = forward_scores(reference_model, padded, autocast=False)
    truth = sequences(true_logps, padded)
    logps, h = forward_scores(model, padded, autocast=True)
    dh = (h - true_h).abs()
    assert dh.max() > 0, "the bf16 forward ran in fp32"
    assert_within(dh.max(), hidden_budget(model.config) * true_h.abs().max(), "padded's final hidden states")
    # the head sees these hidden states; with bf16 weights it rounds its logits too (for Gemma-2's
    # soft-cap, |tanh'| ≤ 1: an error in z is not enlarged, and the softmax is of the capped logits)
    head = reference_model.get_output_embeddings().weight.double()
    z, e = logit_error(true_h.double(), head, dh=dh.double(), logits_rounded=weights == "bfloat16")
    transform = head_transform(model.config)
    if transform is not None:
        z = transform(z)
    bound = logp_error(z, e, padded["score_target"])
    assert_within((logps.double() - true_logps.double()).abs(), SAFETY * bound, "padded's token log-probs")
    padded_error = (sequences(logps, padded) - truth).abs().max()

    for layout in ("shared", "packed"):
        batch = collator_for(cfg, 0, layout, attn)(pairs)
        error = (sequences(forward_scores(model, batch, autocast=True)[0], batch) - truth).abs().max()
        assert_within(error, PADDED_FACTOR * padded_error, f"{layout}: sequence log-probs")
        # not vacuous: with the rejected branch allowed to see the chosen one, the criterion fails
        batch["branch_ids"][batch["branch_ids"] == 2] = 1
        wrong = (sequences(forward_scores(model, batch, autocast=True)[0], batch) - truth).abs().max()
        assert wrong > PADDED_FACTOR * padded_error, f"{layout}: a wrong mask passes"


def training_step(model, layout, method, pairs, tmp_path, bf16: bool, monkeypatch):
    """compute_loss + backward as the Trainer runs them (with bf16, accelerate's autocast wrapper
    around the forward). Returns the loss, the token log-probs in sequence order with the loss's
    gradient for each, and every parameter's gradient, all float64."""
    trainer = make_trainer(model, {"method": method}, tmp_path / f"{layout}-{bf16}", layout=layout, bf16=bf16)
    if bf16:
        trainer.accelerator.prepare_model(model)
    seen = {}

    def recording(*args, **kwargs):
        seen["tok"] = tok = token_logps(*args, **kwargs)
        tok.logps.retain_grad()
        return tok

    def recording_ahead(*args, **kwargs):  # the training step's head, its gradient formed in forward
        tok = ahead_scores(*args, **kwargs)
        if tok is not None:
            seen["tok"] = tok
            tok.logps.retain_grad()
        return tok

    monkeypatch.setattr(prefopt.scoring, "token_logps", recording)
    monkeypatch.setattr(prefopt.scoring, "ahead_scores", recording_ahead)
    batch = trainer.data_collator(pairs)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    order = torch.sort(batch["score_seq"], stable=True).indices  # each sequence's tokens in order, any layout
    logps = seen["tok"].logps
    return (loss.item(), logps.detach()[order].double(), logps.grad[order].double(),
            {name: p.grad.double() for name, p in model.named_parameters()})


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
@pytest.mark.parametrize("method", ["cpo_simpo", "orpo"])
def test_loss_and_gradients_under_bf16_are_as_close_to_fp32_as_padded(arch, attn, method, weights, tmp_path,
                                                                      monkeypatch):
    pairs = random_pairs(5, seed=8, max_prompt=12, max_completion=12)
    model, reference_model = bf16_model(arch, attn, weights)

    def step(m, layout, bf16):
        return training_step(m, layout, method, pairs, tmp_path, bf16, monkeypatch)

    true_loss, true_logps, sensitivity, true_grads = step(reference_model, "padded", False)
    _, padded_logps, _, padded_grads = step(copy.deepcopy(model), "padded", True)
    token_error = (padded_logps - true_logps).abs().max()
    grad_error = {name: (g - true_grads[name]).norm() for name, g in padded_grads.items()}
    assert token_error > 0 and min(grad_error.values()) > 0, "the bf16 step ran in fp32"
    for layout in ("shared", "packed"):
        loss, logps, _, grads = step(copy.deepcopy(model), layout, True)
        assert_within((logps - true_logps).abs().max(), PADDED_FACTOR * token_error, f"{layout}: token log-probs")
        # the loss is a function of the token log-probs alone: to first order it moves by
        # Σ_t |∂loss/∂log p_t| · |Δ log p_t|, here with the tolerated token error
        assert_within(abs(loss - true_loss), sensitivity.abs().sum() * PADDED_FACTOR * token_error, f"{layout}: loss")
        for name, g in grads.items():
            assert_within((g - true_grads[name]).norm(), PADDED_FACTOR * grad_error[name], f"{layout}: grad {name}")
