"""The fused head's gradient formed in forward (`gradahead`): a whole step's loss, gradients and
metrics equal those of the head that recomputes its softmax in backward, for every loss shape, with
the loss scaled by a factor, with groups of a few pairs, and when the prediction is wrong (then it
recomputes, and says so). Tolerances: both forms run the same fp32 arithmetic per row and sum the
head's gradient over rows in another order (groups of pairs against chunks of rows), so they agree
to round-off relative to the largest element (helpers.assert_grads_close)."""

import dataclasses
import warnings

import pytest
import torch

from helpers import ROUND_OFF_REL, assert_grads_close, assert_logged_close, make_trainer, random_pairs, tiny_random_model
from prefopt import gradahead
from prefopt.metrics import MetricSums
from prefopt.scoring import FusedHead
from prefopt.step import count, loss, score

SHAPES = [
    {"method": "cpo_simpo"},  # mean log-probs, SimPO margin, NLL over the chosen completion
    {"method": "orpo"},  # odds ratio, NLL over prompt + completion
    {"method": "cpo", "loss_type": "sigmoid", "label_smoothing": 0.1},  # summed log-probs, smoothed
    {"method": "cpo", "loss_type": "hinge"},
    {"method": "cpo", "loss_type": "ipo"},
    {"method": "simpo"},
    {"method": "alphapo"},
    {"method": "simper"},
    {"method": "repo"},
]


class Counted:
    """Counts the gradient-ahead forwards and the recomputing backwards (`_FusedHeadLogps._backward`) while in use."""

    def __init__(self, monkeypatch):
        self.forwards = self.recomputes = 0
        forward, recompute = gradahead._FusedHeadAhead.forward, gradahead._FusedHeadLogps._backward

        def counted_forward(*a):
            self.forwards += 1
            return forward(*a)

        def counted_recompute(*a):
            self.recomputes += 1
            return recompute(*a)

        monkeypatch.setattr(gradahead._FusedHeadAhead, "forward", staticmethod(counted_forward))
        # a misprediction recomputes through the recomputing head's backward
        monkeypatch.setattr(gradahead._FusedHeadLogps, "_backward", staticmethod(counted_recompute))


def step(model, trainer, scorer, batch, ahead: bool, factor: float = 1.0):
    """One micro-batch as the trainer runs it (normalised by the step's counts), the loss times
    `factor` (as processes or a loss scaler would); its loss, gradients and logged means."""
    model.zero_grad()
    counts = count(batch, trainer.step_objective)
    objective = trainer.step_objective if ahead else None
    scores = score(model, batch, scorer, None, objective, counts)
    result = loss(scores, trainer.step_objective, counts)
    (factor * result.loss).backward()
    sums = MetricSums()
    sums.record("train", result, scores)
    grads = {n: p.grad.clone() / factor for n, p in model.named_parameters() if p.grad is not None}
    return result.loss.detach(), grads, sums.means("train", lambda t: t, "cpu")


def setup(tmp_path, keys, layout="packed"):
    model = tiny_random_model("llama", seed=5)
    trainer = make_trainer(model, keys, tmp_path, layout=layout)
    scorer = trainer.scorer(model)
    assert isinstance(scorer, FusedHead) and scorer.keep > 100
    batch = trainer.data_collator([dict(p) for p in random_pairs(5, seed=6)])
    return model, trainer, scorer, batch


def assert_same(a, b):
    (la, ga, ma), (lb, gb, mb) = a, b
    assert lb.item() == pytest.approx(la.item(), rel=ROUND_OFF_REL, abs=1e-7)
    assert len(ga) > 5
    assert_grads_close(gb, ga)
    assert_logged_close(ma, mb, ma.keys(), ROUND_OFF_REL)


@pytest.mark.parametrize("keys", SHAPES, ids=lambda k: "-".join(map(str, k.values())))
@pytest.mark.parametrize("chunk", [4, 10**4])  # groups of one or two pairs; every pair in one group
def test_the_gradient_formed_in_forward_equals_the_recomputed_one(tmp_path, monkeypatch, keys, chunk):
    model, trainer, scorer, batch = setup(tmp_path, keys)
    scorer = dataclasses.replace(scorer, chunk=chunk)
    reference = step(model, trainer, dataclasses.replace(scorer, keep=0), batch, ahead=False)
    counted = Counted(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prediction must hold: no recompute, no warning
        ours = step(model, trainer, scorer, batch, ahead=True)
    assert (counted.forwards, counted.recomputes) == (1, 0)
    assert_same(reference, ours)


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_a_scaled_loss_and_other_layouts_keep_the_gradient_ahead(tmp_path, monkeypatch, layout):
    """The loss times 3 (its gradient reaches the head scaled): the head's gradient is scaled too."""
    model, trainer, scorer, batch = setup(tmp_path, {"method": "cpo_simpo"}, layout)
    scorer = dataclasses.replace(scorer, chunk=6)
    reference = step(model, trainer, dataclasses.replace(scorer, keep=0), batch, ahead=False, factor=3.0)
    counted = Counted(monkeypatch)
    ours = step(model, trainer, scorer, batch, ahead=True, factor=3.0)
    assert (counted.forwards, counted.recomputes) == (1, 0)
    assert_same(reference, ours)


def test_a_pair_larger_than_the_budget_takes_the_kept_or_recomputed_path(tmp_path, monkeypatch):
    model, trainer, scorer, batch = setup(tmp_path, {"method": "orpo"})
    rows_per_pair = torch.bincount(batch["score_seq"] % len(batch["row"]))
    small = dataclasses.replace(scorer, chunk=2, keep=int(rows_per_pair.max()) - 1)
    assert gradahead.plan(batch["score_seq"] % len(batch["row"]), 2, small.keep) is None
    reference = step(model, trainer, dataclasses.replace(scorer, keep=0), batch, ahead=False)
    counted = Counted(monkeypatch)
    ours = step(model, trainer, small, batch, ahead=True)
    assert counted.forwards == 0
    assert_same(reference, ours)


def test_a_wrong_prediction_is_recomputed_exactly_and_said(monkeypatch):
    """A loss with a term the prediction does not see: backward finds the real gradient is no
    multiple of the predicted one, warns, and recomputes; values and gradients equal the reference."""
    torch.manual_seed(0)
    N, H, V, pairs = 40, 8, 37, 4
    head = torch.nn.Linear(H, V)
    h0, target, pair = torch.randn(N, H), torch.randint(0, V, (N,)), torch.randint(0, pairs, (N,))

    def objective(lp):  # per pair, plus a term on pair 1 that the prediction leaves out
        return torch.nn.functional.softplus(torch.zeros(pairs).index_add(0, pair, lp)).sum()

    def predicted(lp):
        with torch.enable_grad():
            x = lp.detach().requires_grad_()
            return torch.autograd.grad(objective(x), x)[0]

    def run(logps_of):
        head.zero_grad()
        h = h0.clone().requires_grad_()
        lp = logps_of(h)
        (objective(lp) + 0.5 * (lp * (pair == 1)).sum()).backward()
        return lp.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()

    reference = run(lambda h: torch.log_softmax(head(h), -1).gather(1, target[:, None]).squeeze(1))
    counted = Counted(monkeypatch)
    monkeypatch.setattr(gradahead, "_said", False)
    with pytest.warns(UserWarning, match="recomputed exactly"):
        ours = run(lambda h: gradahead.ahead_scores(h[None], torch.arange(N), target, head, 8, 10**6,
                                                    gradahead.Ahead(pair, predicted)).logps)
    assert (counted.forwards, counted.recomputes) == (1, 1)
    for r, o in zip(reference, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=ROUND_OFF_REL * r.abs().max().item())


def test_groups_hold_whole_pairs():
    pair = torch.tensor([2, 0, 1, 0, 2, 2, 1, 3, 3, 3, 3, 0])
    order, groups = gradahead.plan(pair, 5, 100)
    assert torch.equal(pair[order], torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]))
    assert groups == [(0, 5), (5, 8), (8, 12)]  # 3 + 2 rows, 3, 4: none over max(chunk, largest pair) = 5
    assert gradahead.plan(pair, 5, 3) is None  # a pair of 4 rows does not fit 3


def _pairwise(lp, pair, pairs):  # a loss that is a sum over pairs plus a term linear in the log-probs
    sums = torch.zeros(pairs, dtype=lp.dtype).index_add(0, pair, lp)
    return torch.nn.functional.softplus(-sums / 7).sum() - 0.3 * lp[pair == 0].sum()


def _predict(pair, pairs):
    def d_logps(lp):
        with torch.enable_grad():
            x = lp.detach().requires_grad_()
            return torch.autograd.grad(_pairwise(x, pair, pairs), x)[0]
    return d_logps


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("frozen", [None, "weight", "hidden"])
def test_against_the_full_logits_reference(monkeypatch, with_bias, frozen):
    """Independent of the kernels' shared helpers: values and gradients of h, W and b against
    log_softmax over full logits, the loss's gradient scaled by 2.5, with a frozen head or hidden
    states; then a second, larger micro-batch through the same workspace (it grows)."""
    torch.manual_seed(3)
    H, V, pairs = 12, 41, 5
    head = torch.nn.Linear(H, V, bias=with_bias)
    if frozen == "weight":
        head.requires_grad_(False)
    workspace = gradahead.Workspace()
    counted = Counted(monkeypatch)
    for N in (30, 70):
        head.zero_grad()
        hidden = torch.randn(2, N, H, requires_grad=frozen != "hidden")
        index, target = torch.randperm(2 * N)[:N], torch.randint(0, V, (N,))
        pair = torch.randint(0, pairs, (N,))
        ahead = gradahead.Ahead(pair, _predict(pair, pairs))
        tok = gradahead.ahead_scores(hidden, index, target, head, 6, 10**6, ahead, workspace)
        (2.5 * _pairwise(tok.logps, pair, pairs)).backward()
        ours = [t.grad.clone() for t in (hidden, head.weight, head.bias) if t is not None and t.requires_grad]
        for t in (hidden, head.weight, head.bias):
            if t is not None:
                t.grad = None
        ref = torch.log_softmax(head(hidden.reshape(-1, H)[index]), -1).gather(1, target[:, None]).squeeze(1)
        (2.5 * _pairwise(ref, pair, pairs)).backward()
        torch.testing.assert_close(tok.logps, ref, rtol=1e-5, atol=1e-5)
        theirs = [t.grad for t in (hidden, head.weight, head.bias) if t is not None and t.requires_grad]
        assert len(ours) == len(theirs) == (frozen != "hidden") + (frozen != "weight") * (1 + with_bias)
        for o, r in zip(ours, theirs):
            torch.testing.assert_close(o, r, rtol=0, atol=ROUND_OFF_REL * r.abs().max().item())
        assert workspace.buffer.numel() >= max(torch.bincount(pair).max().item(), 6) * V
    assert (counted.forwards, counted.recomputes) == (2, 0)


def test_under_bf16_autocast_it_equals_the_recomputing_head():
    """Under CPU bf16 autocast both forms run the head's matmuls in bf16 from the same fp32 inputs:
    the gradient formed in forward equals the recomputing head's (`_FusedHeadLogps`) to bf16
    round-off of the products they sum (2⁻⁸ of the largest element)."""
    from prefopt.logprobs import token_logps

    torch.manual_seed(4)
    H, V, N, pairs = 16, 64, 48, 4
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(1, N, H, requires_grad=True)
    target, pair = torch.randint(0, V, (N,)), torch.randint(0, pairs, (N,))
    results = []
    for ahead in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if ahead:
                tok = gradahead.ahead_scores(hidden, torch.arange(N), target, head, 8, 10**6,
                                             gradahead.Ahead(pair, _predict(pair, pairs)))
            else:
                tok = token_logps(hidden, torch.arange(N), target, head, chunk=8, fused=True, keep=0)
            value = _pairwise(tok.logps, pair, pairs)
        value.backward()
        results.append((tok.logps.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
        hidden.grad = None
        head.zero_grad()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=2**-8 * b.abs().max().item())
