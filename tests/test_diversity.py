"""The diversity term: hand-worked on a two-token vocabulary, and equal (values and gradients)
to a plain full-logits reference on a tiny model, in every layout."""

import math

import pytest
import torch

from helpers import ROUND_OFF_REL, assert_grads_close, make_trainer, random_pairs, tiny_random_model
from prefopt.diversity import aligned_pairs
from prefopt.metrics import MetricSums
from prefopt.scoring import FusedHead, ModuleHead, score_with_diversity
from prefopt.step import DiversityRows, loss, score


def test_two_token_vocabulary_by_hand():
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))  # logits = hidden state
    # rows: chosen positions 0, 1 (seq 0), rejected position 0 (seq 1): pair 0 has lengths 2 and 1
    h = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([0, 1, 0])
    seq, index, completion = torch.tensor([0, 0, 1]), torch.tensor([3, 4, 9]), torch.tensor([True, True, True])
    pairs_c, pairs_r, chosen = aligned_pairs(seq, index, completion, B=1)
    assert pairs_c.tolist() == [0] and pairs_r.tolist() == [2] and chosen.tolist() == [0, 1]
    tok = score_with_diversity(h, target, DiversityRows(pairs_c, pairs_r, chosen), head, None, chunk=4)
    logps, entropy, kl = tok.logps, tok.entropy_sum, tok.kl_sum
    # float32 against exact: a handful of roundings of u = 6e-8 each, so 1e-6 relative where the terms
    # have one sign. Chosen position 0: p = (1/2, 1/2), H = ln 2; position 1: p = (4/5, 1/5)
    h1 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert entropy.item() == pytest.approx(math.log(2) + h1, rel=1e-6)
    # aligned: rejected p_r = (3/4, 1/4) against chosen p_c = (1/2, 1/2): only position 0 (shorter length 1).
    # KL = 0.304 − 0.173 = 0.1308: its round-off is relative to the terms (~0.5), so 1e-6 of those
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=0, abs=5e-7)
    assert logps.tolist() == pytest.approx([math.log(0.5), math.log(0.2), math.log(0.75)], rel=1e-6)


def reference(model, pairs, weight, alpha):
    """The diversity loss from full logits, one sequence at a time."""
    entropies, kls = [], []
    for p in pairs:
        P = len(p["prompt_ids"])
        out = {}
        for side in ("chosen", "rejected"):
            ids = torch.tensor([p["prompt_ids"] + p[f"{side}_ids"]])
            logits = model(ids).logits[0].float()
            out[side] = torch.log_softmax(logits[P - 1 : ids.shape[1] - 1], -1)  # positions predicting the answer
        c, r = out["chosen"], out["rejected"]
        entropies.append(-(c.exp() * c).sum(-1))
        n = min(len(c), len(r))
        kls.append((r[:n].exp() * (r[:n] - c[:n])).sum(-1))
    entropy, kl = torch.cat(entropies).mean(), torch.cat(kls).mean()
    return weight * (-alpha * entropy + (1 - alpha) * kl), entropy, kl


@pytest.mark.parametrize("scorer", ["fused", "module"])
@pytest.mark.parametrize("layout", ["padded", "shared", "packed"])
def test_values_and_gradients_equal_a_full_logits_reference(tmp_path, layout, scorer):
    pairs = random_pairs(5, seed=3, max_completion=8)
    w, a = 0.7, 0.3
    grads, losses = [], []
    for weight in (w, 0.0):
        model = tiny_random_model("llama", seed=2)
        trainer = make_trainer(model, {"method": "simpo", "diversity_weight": weight, "diversity_alpha": a},
                               tmp_path / str(weight), layout=layout)
        batch = trainer.data_collator([dict(p) for p in pairs])
        chosen = trainer.scorer(model)
        assert isinstance(chosen, FusedHead) and chosen.diversity == bool(weight)  # a plain Linear head: fused
        if scorer == "module" and weight:
            chosen = ModuleHead(**{k: getattr(chosen, k) for k in ("unwrapped", "chunk", "transform", "aux", "diversity")},
                                why="test")
        scores = score(model, batch, chosen)
        step = loss(scores, trainer.step_objective)
        total = step.loss
        if weight == 0.0:
            div, entropy, kl = reference(model, pairs, w, a)
            total = total + div
        total.backward()
        losses.append(total.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if weight:
            sums = MetricSums()
            sums.record("train", step, scores)
            measured = {k: v for k, v in sums.means("train", lambda t: t, "cpu").items() if k.startswith("diversity/")}
    # the same step on the same weights, summed in another order (tests/helpers.py: ROUND_OFF_REL), each
    # value relative to the size of its terms: the loss adds −α·w·H to the SimPO term, and the KL is a
    # difference of a cross-entropy and an entropy, each of the size of H
    terms = abs(losses[1].item()) + w * a * entropy.item()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=0, abs=ROUND_OFF_REL * terms)
    assert measured["diversity/entropy"] == pytest.approx(entropy.item(), rel=ROUND_OFF_REL)
    assert measured["diversity/kl"] == pytest.approx(kl.item(), rel=0, abs=ROUND_OFF_REL * entropy.item())
    assert_grads_close(grads[0], grads[1])


@pytest.mark.parametrize("chunk", [2, 5, 64])
def test_the_fused_kernel_equals_the_module_chunks(chunk):
    """The diversity term's fused kernel against the checkpointed module path on the same rows:
    log-probs, entropy, KL and the gradients of h, W and b, for chunks that split the pairs."""
    torch.manual_seed(0)
    N, H, V = 23, 8, 37
    head = torch.nn.Linear(H, V, bias=True)
    h = torch.randn(N, H, requires_grad=True)
    target = torch.randint(0, V, (N,))
    rows = DiversityRows(pairs_c=torch.tensor([0, 2, 4, 6, 8, 10]), pairs_r=torch.tensor([13, 15, 17, 19, 21, 22]),
                         chosen=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
    weights = torch.randn(N)  # an uneven weight per log-prob, so every row's gradient differs
    results = []
    for fused in (True, False):
        head.zero_grad()
        h.grad = None
        if fused:
            from prefopt.logprobs import fused_diversity_scores
            tok = fused_diversity_scores(h, target, rows.pairs_c, rows.pairs_r, rows.chosen, head, chunk)
        else:
            tok = score_with_diversity(h, target, rows, head, None, chunk)
        (tok.logps * weights).sum().add(0.3 * tok.entropy_sum - 0.7 * tok.kl_sum).backward()
        results.append((tok.logps.detach(), tok.mean_logits, tok.entropy_sum.detach(), tok.kl_sum.detach(),
                        h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
    # the same float32 sums in another order: ROUND_OFF_REL of the size of the terms summed (tests/helpers.py)
    for a, b in zip(*results):
        scale = max(a.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, rtol=0, atol=ROUND_OFF_REL * scale)
