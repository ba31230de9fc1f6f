"""Tier one: loss values worked out by hand, and the numeric edges.

The expected numbers come from the papers' formulas evaluated with `math`, never from the code
under test. Shorthand: lw, ll are the chosen and rejected log-probs (already reduced).

Tolerances: the code computes in float32, a handful of operations each rounding by at most
u = 2⁻²⁴ ≈ 6e-8 relative, so a formula's value is compared at rel=1e-6 (~16u); a constant
written with six significant digits is itself off by up to 5e-7, so it is compared at abs=1e-6.
"""

import math

import pytest
import torch

from prefopt import losses as losses_mod
from prefopt.losses import LOSSES, METHODS, Hyper, Method, Pairs, log1mexp, shaped_reward

t = lambda *xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731


def loss(shape, lw, ll, h, tokens=(3, 5)):
    """LOSSES[shape] on B pairs with these reduced log-probs (token counts: `tokens` per pair)."""
    count = lambda n: torch.full(lw.shape, float(n))  # noqa: E731
    return LOSSES[shape].fn(Pairs(lw, ll, count(tokens[0]), count(tokens[1])), h)


def softplus(x):  # -log σ(x)
    return math.log1p(math.exp(-x))


def test_simpo_sigmoid_by_hand():
    # lw=-1, ll=-2, β=2, γ/β=0.5: z = 2·((−1 − −2) − 0.5) = 1, L = −log σ(1) = log(1 + e⁻¹) ≈ 0.31326
    losses, rw, rl, extras = loss("sigmoid", t(-1.0), t(-2.0), Hyper(beta=2.0, gamma_beta_ratio=0.5))
    assert losses.item() == pytest.approx(softplus(1.0), rel=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert (rw.item(), rl.item()) == (-2.0, -4.0)  # rewards are β·log p
    assert extras == {}


def test_margin_at_the_target_gives_log2_and_hinge_one():
    # gap exactly γ/β: z = 0, so sigmoid gives log 2 and hinge gives 1
    h = Hyper(beta=2.0, gamma_beta_ratio=0.5)
    assert loss("sigmoid", t(-1.5), t(-2.0), h)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert loss("hinge", t(-1.5), t(-2.0), h)[0].item() == 1.0  # 1 − 2·(0.5 − 0.5): every step exact
    # separated by more than 1/β + γ/β = 1: hinge is exactly zero
    assert loss("hinge", t(-0.5), t(-2.0), h)[0].item() == 0.0


def test_label_smoothing_by_hand():
    # z = 1, ε = 0.1: L = 0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·0.313262 + 0.1·1.313262 ≈ 0.413262
    losses = loss("sigmoid", t(-1.0), t(-2.0), Hyper(beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1))[0]
    assert losses.item() == pytest.approx(0.9 * softplus(1.0) + 0.1 * softplus(-1.0), rel=1e-6)
    assert losses.item() == pytest.approx(0.413262, abs=1e-6)


def test_cpo_sigmoid_has_no_margin():
    # CPO: summed log-probs, z = β·(lw − ll) = 0.1·(−10 − −14) = 0.4
    losses = loss("sigmoid", t(-10.0), t(-14.0), Hyper(beta=0.1))[0]
    assert losses.item() == pytest.approx(softplus(0.4), rel=1e-6)


def test_ipo_by_hand():
    # β = 0.1: target gap 1/(2β) = 5; gap 1 → (1 − 5)² = 16
    losses, rw, rl, _ = loss("ipo", t(-1.0), t(-2.0), Hyper(beta=0.1))
    assert losses.item() == pytest.approx(16.0, rel=1e-6)
    assert rw.item() == pytest.approx(-0.1)


def test_alphapo_reward_shape_by_hand():
    # α = 0.25: r(−1) = (1 − e^0.25)/0.25 ≈ −1.136102, r(−2) = (1 − e^0.5)/0.25 ≈ −2.594885
    r = shaped_reward(t(-1.0, -2.0), 0.25)
    assert r.tolist() == pytest.approx([(1 - math.exp(0.25)) / 0.25, (1 - math.exp(0.5)) / 0.25], rel=1e-6)
    # SimPO loss on the shaped rewards: z = 2·(1.458783 − 0.5) ≈ 1.917567, L ≈ 0.137119
    losses, rw, _, _ = loss("sigmoid", t(-1.0), t(-2.0), Hyper(beta=2.0, gamma_beta_ratio=0.5, alpha=0.25))
    gap = (1 - math.exp(0.25)) / 0.25 - (1 - math.exp(0.5)) / 0.25
    assert losses.item() == pytest.approx(softplus(2.0 * (gap - 0.5)), rel=1e-6)
    assert losses.item() == pytest.approx(0.137119, abs=1e-6)
    assert rw.item() == pytest.approx(2.0 * (1 - math.exp(0.25)) / 0.25, rel=1e-6)  # β·r
    # α → 0 recovers the log-prob reward: (1 − e^(−α·lp))/α = lp − α·lp²/2 + …, 4.5e-6 from −3 at α = 1e-6
    assert shaped_reward(t(-3.0), 1e-6).item() == pytest.approx(-3.0, abs=1e-5)


def test_orpo_by_hand():
    # lw = −0.5, ll = −1: log odds = lp − log(1 − e^lp)
    lw, ll, lam = -0.5, -1.0, 0.1
    odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
    gap = odds(lw) - odds(ll)  # ≈ 0.432752 − (−0.541325) = 0.974077
    losses, rw, rl, extras = loss("odds_ratio", t(lw), t(ll), Hyper(beta=lam))
    assert gap == pytest.approx(0.974077, abs=1e-6)
    assert losses.item() == pytest.approx(lam * softplus(gap), rel=1e-6)
    assert extras["log_odds_chosen"].item() == pytest.approx(gap, rel=1e-6)
    assert extras["log_odds_ratio"].item() == pytest.approx(-softplus(gap), rel=1e-6)
    assert (rw.item(), rl.item()) == pytest.approx((lam * lw, lam * ll))


@pytest.mark.parametrize("lp", [-1e-9, -1e-7, -1e-4, -0.3, -0.6931, -0.7, -5.0, -80.0, -1e4])
def test_log1mexp_is_accurate_on_both_sides_of_the_switch(lp):
    exact = math.log(-math.expm1(lp)) if lp > -0.6931 else math.log1p(-math.exp(lp))
    got = log1mexp(torch.tensor(lp, dtype=torch.float64)).item()
    # float64 (u = 1.1e-16): the stable forms agree to a few u, and 1e-12 leaves room for libm's own
    # errors; the naive log(1 − e^lp) is off by 5e-9 at lp = −1e-9. abs: at −1e4 the exact value is −0.0
    assert got == pytest.approx(exact, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_numeric_edges_give_finite_losses_and_gradients(name):
    # near-certain completions (log p → 0, ORPO's log1mexp edge), hopeless ones, and a tie
    lw = torch.tensor([0.0, -1e-8, -1e-3, -50.0, -1e4, -2.0], requires_grad=True)
    ll = torch.tensor([-1e-8, 0.0, -1e4, -1e-3, -50.0, -2.0], requires_grad=True)
    losses = loss(name, lw, ll, Hyper(beta=2.0, gamma_beta_ratio=0.5 if name != "ipo" else 0.0, gamma=0.5))[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()


def test_losses_are_unreduced_and_rewards_detached():
    lw = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    for name in LOSSES:
        losses, rw, rl, _ = loss(name, lw, lw - 1, Hyper(beta=1.0, gamma=2.0))
        assert losses.shape == (3,)
        assert not rw.requires_grad and not rl.requires_grad


def test_the_sign_is_right_raising_chosen_lowers_the_loss():
    # a flipped sign would pass a smoke test; this would not
    for name in ("sigmoid", "hinge", "odds_ratio", "simper", "repo"):
        lw = torch.tensor([-1.5], requires_grad=True)
        loss(name, lw, torch.tensor([-1.6]), Hyper(beta=2.0, gamma=0.5))[0].sum().backward()
        assert lw.grad.item() < 0, name


def test_method_table_reductions_and_defaults():
    assert METHODS["simpo"].losses == {"sigmoid": "mean", "hinge": "mean"}
    assert METHODS["cpo"].losses == {"sigmoid": "sum", "hinge": "sum", "ipo": "mean"}
    assert METHODS["orpo"].losses == {"odds_ratio": "mean"} and METHODS["orpo"].nll_span == "prompt+completion"
    # the papers' defaults: SimPO has no NLL term; CPO's NLL weight is 1
    assert METHODS["simpo"].defaults == {"beta": 2.0, "gamma_beta_ratio": 0.5, "nll_weight": 0.0, "alpha": 0.0}
    assert METHODS["cpo"].defaults["nll_weight"] == 1.0 and METHODS["cpo"].defaults["beta"] == 0.1
    assert METHODS["cpo_simpo"].defaults["nll_weight"] > 0


def test_simper_by_hand():
    # SimPER: L = −exp(ℓ̄_w) + exp(ℓ̄_l); ℓ̄_w = −0.5, ℓ̄_l = −1: −e^−0.5 + e^−1 = −0.606531 + 0.367879 = −0.238651
    losses, rw, rl, extras = loss("simper", t(-0.5), t(-1.0), Hyper())
    assert losses.item() == pytest.approx(-math.exp(-0.5) + math.exp(-1.0), rel=1e-6)
    assert losses.item() == pytest.approx(-0.238651, abs=1e-6)
    assert (rw.item(), rl.item()) == (-0.5, -1.0) and extras == {}  # rewards: the mean log-probs
    # the gradient: dL/dℓ̄_w = −exp(ℓ̄_w), dL/dℓ̄_l = exp(ℓ̄_l)
    lw, ll = t(-0.5).requires_grad_(), t(-1.0).requires_grad_()
    loss("simper", lw, ll, Hyper())[0].sum().backward()
    assert (lw.grad.item(), ll.grad.item()) == pytest.approx((-math.exp(-0.5), math.exp(-1.0)), rel=1e-6)
    # no hyperparameter reaches it: β, γ, α change nothing
    assert loss("simper", t(-0.5), t(-1.0), Hyper(beta=7.0, gamma=3.0, alpha=0.3))[0].item() == losses.item()


def test_repo_by_hand():
    # RePO: L = max(0, γ − (ℓ̄_w − ℓ̄_l)), γ absolute. γ = 0.6: gap 0.25 → 0.35; gap 1 → 0 (separated)
    losses, rw, rl, _ = loss("repo", t(-1.0, -1.0), t(-1.25, -2.0), Hyper(gamma=0.6))
    assert losses.tolist() == pytest.approx([0.35, 0.0], abs=1e-6)
    assert rw.tolist() == [-1.0, -1.0] and rl.tolist() == [-1.25, -2.0]
    # every pair inside the margin gets the same gradient, −1 on ℓ̄_w and +1 on ℓ̄_l; separated pairs none
    lw, ll = t(-1.0, -1.0).requires_grad_(), t(-1.25, -2.0).requires_grad_()
    loss("repo", lw, ll, Hyper(gamma=0.6))[0].sum().backward()
    assert lw.grad.tolist() == [-1.0, 0.0] and ll.grad.tolist() == [1.0, 0.0]
    # β is not part of RePO
    assert loss("repo", t(-1.0), t(-1.25), Hyper(beta=9.0, gamma=0.6))[0].item() == pytest.approx(0.35, abs=1e-6)


def test_new_methods_take_only_their_own_hyperparameters():
    assert METHODS["simper"].takes == frozenset() and METHODS["simper"].losses == {"simper": "mean"}
    assert METHODS["repo"].takes == {"gamma"} and METHODS["repo"].losses == {"repo": "mean"}
    assert METHODS["repo"].defaults["gamma"] == 0.6


def test_the_tables_are_checked_at_import(monkeypatch):
    # a method whose defaults name a hyperparameter that does not exist, or that its loss ignores
    for bad in (Method("x", "p", {"sigmoid": "mean"}, "completion", {"betta": 1.0, "nll_weight": 0.0}),
                Method("x", "p", {"odds_ratio": "mean"}, "completion", {"alpha": 0.1, "nll_weight": 0.0}),
                Method("x", "p", {"nope": "mean"}, "completion", {"nll_weight": 0.0}),
                Method("x", "p", {"simper": "mean"}, "completion", {})):
        monkeypatch.setitem(METHODS, "x", bad)
        with pytest.raises(AssertionError):
            losses_mod._check_tables()
    monkeypatch.delitem(METHODS, "x")
    losses_mod._check_tables()
