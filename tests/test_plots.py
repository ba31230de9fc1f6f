"""`prefopt plot`: PNGs of a run's metrics, train and eval together; rendered and read back."""

import json

import pytest
from PIL import Image

from prefopt.cli import main
from prefopt.errors import PrefoptError
from prefopt.plots import plot_run


def _write_run(folder, orpo=False):
    lines = []
    for step in range(1, 7):
        line = {"step": step, "epoch": step / 6, "loss": 1.0 / step, "grad_norm": 1.0, "learning_rate": 1e-3 * (7 - step),
                "rewards/chosen": -2.0 + 0.1 * step, "rewards/rejected": -2.0 - 0.1 * step,
                "rewards/margins": 0.2 * step, "rewards/accuracies": min(1.0, 0.4 + 0.1 * step),
                "logps/chosen": -1.0, "logps/rejected": -1.2, "nll_loss": 0.9, "lengths/chosen": 12.0,
                "lengths/rejected": 14.0}
        if orpo:
            line |= {"log_odds_ratio": -0.5, "log_odds_chosen": 0.3}
        lines.append(line)
        if step % 3 == 0:
            lines.append({"step": step, "epoch": step / 6, "eval_loss": 1.2 / step, "eval_rewards/chosen": -2.0,
                          "eval_rewards/rejected": -2.5, "eval_rewards/margins": 0.5, "eval_rewards/accuracies": 0.7,
                          "eval_logps/chosen": -1.1, "eval_logps/rejected": -1.3, "eval_nll_loss": 1.0,
                          "eval_lengths/chosen": 11.0, "eval_lengths/rejected": 15.0})
    lines.append({"step": 6, "epoch": 1.0, "train_runtime": 3.2, "train_loss": 0.4})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_every_quantity_is_drawn_train_and_eval_together(tmp_path):
    _write_run(tmp_path)
    written = plot_run(tmp_path)
    assert written["loss.png"] == ["loss", "eval_loss"]
    assert written["rewards.png"] == ["rewards/chosen", "eval_rewards/chosen", "rewards/rejected",
                                      "eval_rewards/rejected"]
    assert written["accuracies.png"] == ["rewards/accuracies", "eval_rewards/accuracies"]
    assert written["learning_rate.png"] == ["learning_rate"]
    assert {"nll.png", "margins.png", "logps.png", "lengths.png"} <= written.keys()
    assert "log_odds.png" not in written  # nothing logged for it: no empty picture
    for name in written:
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.format == "PNG" and image.size == (700, 400)
            assert len(set(image.convert("L").getdata())) > 10  # lines and text were drawn


def test_cli_and_errors(tmp_path, capsys):
    _write_run(tmp_path / "run", orpo=True)
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert "log_odds.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n')
    with pytest.raises(PrefoptError, match="metrics.jsonl line 2: not valid JSON"):
        plot_run(tmp_path / "bad")
