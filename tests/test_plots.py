"""`prefopt plot`: what is drawn, read back from the matplotlib Figures (scales, lines, labels,
titles) on synthetic metrics.jsonl files of SimPO's, CPO-SimPO's and ORPO's shapes; and the PNGs."""

import json
import math
import random
import shutil

import pytest
import yaml
from PIL import Image

from prefopt.cli import main
from prefopt.errors import PrefoptError
from prefopt.plots import figures, plot_run
from prefopt.plotspec import LOG_SPAN, PANELS, label, log_axis, run_info, smooth, smoothing_span

NLL = {"simpo": 0.0, "cpo_simpo": 1.0, "orpo": 1.0}


def _write_run(folder, method="simpo", steps=300, eval_every=50, loss_from=2.0, loss_to=0.02, run_name=None):
    """A run's metrics.jsonl (a train line every step, an evaluation every `eval_every`), shaped as
    `method` logs them: the loss falls from `loss_from` to `loss_to` (geometrically, with noise),
    SimPO's NLL term is logged as 0, ORPO adds its log-odds; and the resolved config beside it."""
    rng = random.Random(0)
    lines = []
    for step in range(1, steps + 1):
        t = (step - 1) / max(steps - 1, 1)
        loss = loss_from * (loss_to / loss_from) ** t * math.exp(rng.gauss(0, 0.2))
        line = {"step": step, "epoch": t, "loss": loss, "grad_norm": 2.0 + rng.random(), "learning_rate": 1e-3 * (1 - t),
                "rewards/chosen": -2.0 + t + rng.gauss(0, 0.1), "rewards/rejected": -2.0 - t + rng.gauss(0, 0.1),
                "rewards/margins": 2 * t + rng.gauss(0, 0.1), "rewards/accuracies": min(1.0, 0.5 + t * rng.random()),
                "logps/chosen": -1.0 + 0.3 * t, "logps/rejected": -1.0 - 0.3 * t, "nll_loss": NLL[method] * (1.5 - t),
                "lengths/chosen": 12.0, "lengths/rejected": 14.0, "logits/chosen": 0.1}
        if method == "orpo":
            line |= {"log_odds_ratio": -0.7 + 0.5 * t, "log_odds_chosen": 2 * t}
        lines.append(line)
        if step % eval_every == 0 or step == 1:
            lines.append({"step": step, "epoch": t, "eval_loss": 1.2 * loss, "eval_runtime": 0.1,
                          "eval_rewards/accuracies": 0.5 + 0.4 * t, "eval_rewards/margins": t,
                          "eval_rewards/chosen": -2.0, "eval_rewards/rejected": -2.0 - t, "eval_logps/chosen": -1.1,
                          "eval_logps/rejected": -1.3, "eval_nll_loss": NLL[method], "eval_lengths/chosen": 11.0,
                          "eval_lengths/rejected": 15.0} | ({"eval_log_odds_ratio": -0.5} if method == "orpo" else {}))
    lines.append({"step": steps, "epoch": 1.0, "train_runtime": 3.2, "train_loss": 0.4})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = {"method": method, "loss_type": "odds_ratio" if method == "orpo" else "sigmoid", "output_dir": str(folder)}
    (folder / "prefopt_config.yaml").write_text(yaml.safe_dump(config | ({"run_name": run_name} if run_name else {})))
    return folder


def _lines(fig):
    """gid → Line2D of every line on the figure's axes."""
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}


def _axis(fig, title):
    return next(ax for ax in fig.axes if ax.get_visible() and ax.get_title() == title)


def test_simpo_overview_draws_what_was_logged_and_not_the_zero_nll(tmp_path):
    out = _write_run(tmp_path / "simpo-run", "simpo")
    built = figures(out)
    assert next(iter(built)) == "overview.png"
    overview = built["overview.png"]
    assert overview.get_suptitle() == "simpo-run · simpo (sigmoid loss) · 300 steps"
    lines = _lines(overview)
    assert "nll_loss" not in lines and "eval_nll_loss" not in lines  # SimPO logs 0: no line, no panel
    assert "nll.png" not in built and "NLL term" not in [ax.get_title() for ax in overview.axes]
    assert "log_odds.png" not in built and "logits/chosen" not in lines  # not logged / not drawn
    titles = [ax.get_title() for ax in overview.axes if ax.get_visible()]
    assert titles == ["Loss", "Preference accuracy", "Reward margin", "Rewards", "Log-probabilities",
                      "Response lengths", "Gradient norm", "Learning rate"]
    assert len(overview.axes) == 9 and not overview.axes[-1].get_visible()  # 3 × 3, the spare cell hidden
    # loss spans two decades: log; everything else here moves within one: linear
    assert _axis(overview, "Loss").get_yscale() == "log"
    assert {_axis(overview, t).get_yscale() for t in titles if t != "Loss"} == {"linear"}
    assert built["loss.png"].axes[0].get_yscale() == "log"


def test_legends_name_what_each_metric_is(tmp_path):
    fig = figures(_write_run(tmp_path / "r", "simpo"))["overview.png"]
    legend = [t.get_text() for t in _axis(fig, "Preference accuracy").get_legend().get_texts()]
    assert legend == ["preference accuracy (train, smoothed)", "preference accuracy (held-out)"]
    legend = [t.get_text() for t in _axis(fig, "Log-probabilities").get_legend().get_texts()]
    assert legend == ["chosen log-prob (mean per token, train, smoothed)", "chosen log-prob (mean per token, held-out)",
                      "rejected log-prob (mean per token, train, smoothed)", "rejected log-prob (mean per token, held-out)"]
    assert _axis(fig, "Rewards").get_ylabel() == "reward = β · mean log p"
    assert _axis(fig, "Gradient norm").get_ylabel() == "‖gradient‖ before clipping"


def test_train_is_smoothed_over_faint_logged_values_and_eval_is_markers(tmp_path):
    lines = _lines(figures(_write_run(tmp_path / "r", "simpo", steps=300, eval_every=100))["overview.png"])
    logged, smoothed, held_out = lines["loss:logged"], lines["loss"], lines["eval_loss"]
    assert logged.get_alpha() < 0.5 and smoothed.get_alpha() is None
    assert list(logged.get_xdata()) == list(smoothed.get_xdata()) == list(range(1, 301))
    assert list(smoothed.get_ydata()) == smooth(list(logged.get_ydata()))
    assert list(held_out.get_xdata()) == [1, 100, 200, 300]
    assert held_out.get_marker() == "o" and held_out.get_linestyle() == ":" and held_out.get_linewidth() <= 1
    assert logged.get_label().startswith("_")  # the faint line is not in the legend


def test_short_run_is_drawn_as_logged_and_a_flat_loss_keeps_a_linear_axis(tmp_path):
    built = figures(_write_run(tmp_path / "r", "simpo", steps=20, eval_every=10, loss_from=0.9, loss_to=0.6))
    lines = _lines(built["overview.png"])
    assert "loss:logged" not in lines and lines["loss"].get_alpha() is None  # 20 points: no smoothing
    assert _axis(built["overview.png"], "Loss").get_yscale() == "linear"
    assert len(built["overview.png"].axes) == 9  # 8 panels in three columns


def test_cpo_simpo_draws_its_nll_term(tmp_path):
    built = figures(_write_run(tmp_path / "r", "cpo_simpo"))
    lines = _lines(built["overview.png"])
    assert {"nll_loss", "eval_nll_loss"} <= lines.keys()
    ax = _axis(built["overview.png"], "NLL term")
    assert ax.get_yscale() == "linear"  # 1.5 → 0.5: within a decade
    assert ax.get_ylabel() == "NLL per token (chosen response)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["NLL term (train, smoothed)", "NLL term (held-out)"]


def test_orpo_log_odds_have_their_own_panels_and_names(tmp_path):
    built = figures(_write_run(tmp_path / "orpo-7", "orpo", run_name="my orpo"))
    fig = built["overview.png"]
    assert fig.get_suptitle().startswith("my orpo · orpo (odds_ratio loss)")
    gap, ratio = _axis(fig, "ORPO log-odds gap"), _axis(fig, "ORPO log σ(log-odds gap)")
    assert gap.get_ylabel() == "log odds(chosen) − log odds(rejected)"
    assert ratio.get_ylabel() == "log σ(gap) = −(odds-ratio term) / λ"
    assert [t.get_text() for t in ratio.get_legend().get_texts()] == ["log σ(log-odds gap) (train, smoothed)",
                                                                      "log σ(log-odds gap) (held-out)"]
    assert _axis(fig, "NLL term").get_ylabel() == "NLL per token (prompt + chosen)"
    assert _axis(fig, "Rewards").get_ylabel() == "reward = λ · mean log p"
    assert {"log_odds.png", "log_odds_ratio.png"} <= built.keys()


def test_the_scale_is_read_from_the_data_and_only_where_a_quantity_may_fall_by_decades(tmp_path):
    out = _write_run(tmp_path / "r", "simpo", steps=60, loss_from=0.9, loss_to=0.6)
    lines = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    for i, line in enumerate(l for l in lines if "grad_norm" in l):
        # the norm falls 1000 → 1 (log); the learning rate 1 → 1e-4, a schedule (linear all the same)
        line |= {"grad_norm": 1000 * 0.9 ** i, "learning_rate": 10 ** (-i / 15), "diversity/entropy": 2.0,
                 "diversity/kl": 0.1 * i, "aux_loss": 0.01}
    # a window with nothing to average logs NaN: skipped, not drawn
    next(l for l in lines if l["step"] == 4 and "loss" in l)["loss"] = float("nan")
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    fig = figures(out)["overview.png"]
    assert _axis(fig, "Gradient norm").get_yscale() == "log"
    assert _axis(fig, "Learning rate").get_yscale() == "linear"
    assert _axis(fig, "Loss").get_yscale() == "linear"
    assert 4 not in _lines(fig)["loss:logged"].get_xdata() and len(_lines(fig)["loss:logged"].get_xdata()) == 59
    legend = [t.get_text() for t in _axis(fig, "Diversity term").get_legend().get_texts()]
    assert legend == ["entropy of chosen (train, smoothed)", "KL(rejected ‖ chosen) (train, smoothed)"]
    assert _axis(fig, "MoE load-balancing loss").get_yscale() == "linear"  # constant: not 0, so drawn


def test_rules():
    assert smoothing_span(49) is None and smoothing_span(50) == 2 and smoothing_span(1000) == 40
    values = [1.0] * 60 + [0.0] * 60
    smoothed = smooth(values)
    assert smoothed[:60] == pytest.approx([1.0] * 60)  # debiased: no rise from 0 at the start
    assert 0 < smoothed[60] < 1 and smoothed[-1] < 0.01  # follows a step within a few spans
    loss = next(p for p in PANELS if p.stem == "loss")
    info = run_info("/nonexistent")
    assert info.method is None and "method not recorded" in info.title
    assert label("eval_logps/chosen", info) == "chosen log-prob (as the objective reduces it, held-out)"
    assert not log_axis(loss, [1.0, LOG_SPAN]) and log_axis(loss, [1.0, LOG_SPAN * 1.01])
    assert not log_axis(loss, [-1.0, 100.0]) and not log_axis(loss, [0.0, 100.0]) and not log_axis(loss, [])
    assert not log_axis(next(p for p in PANELS if p.stem == "learning_rate"), [1e-6, 1e-3])  # a schedule


def test_pngs_written_as_a_person_sees_them(tmp_path):
    out = _write_run(tmp_path / "run", "orpo")
    (out / "plots").mkdir()
    (out / "plots" / "nll.png").write_bytes(b"stale")  # drawn by an older prefopt: no longer this run's
    written = plot_run(out)
    assert written["loss.png"] == ["loss", "eval_loss"]
    assert written["rewards.png"] == ["rewards/chosen", "eval_rewards/chosen", "rewards/rejected",
                                      "eval_rewards/rejected"]
    assert written["learning_rate.png"] == ["learning_rate"]
    assert "nll.png" in written  # ORPO's NLL term is drawn
    for name in written:
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG"
            assert image.size == ((1560, 1460) if name == "overview.png" else (700, 400))
            assert len(set(image.convert("L").getdata())) > 10  # lines and text were drawn
    simpo = _write_run(tmp_path / "simpo", "simpo")
    (simpo / "plots").mkdir()
    shutil.copy(out / "plots" / "nll.png", simpo / "plots" / "nll.png")  # prefopt's own, from an ORPO run
    assert "nll.png" not in plot_run(simpo) and not (simpo / "plots" / "nll.png").exists()
    (simpo / "plots" / "nll.png").write_bytes(b"the user's picture")  # not drawn by prefopt: kept
    plot_run(simpo)
    assert (simpo / "plots" / "nll.png").read_bytes() == b"the user's picture"


def test_cli_and_errors(tmp_path, capsys):
    _write_run(tmp_path / "run", "orpo")
    assert main(["plot", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "overview.png" in printed and "log_odds.png" in printed
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n')
    with pytest.raises(PrefoptError, match="metrics.jsonl line 2: not valid JSON"):
        plot_run(tmp_path / "bad")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "metrics.jsonl").write_text('{"step": 1, "nll_loss": 0.0}\n{"step": 1, "train_runtime": 1}\n')
    with pytest.raises(PrefoptError, match="holds no logged metrics to plot yet"):
        plot_run(tmp_path / "zero")
