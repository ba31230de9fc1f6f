"""The disk check before training (prefopt.disk): a run whose checkpoints cannot fit under
output_dir is refused before step 1, with the numbers and the fixes, leaving only the small files
prefopt writes before training (and the user's); one that barely fits is warned about and trains;
the estimate against the real checkpoint folders of a tiny run; save_total_limit's default (2) in
effect and said; `config explain`'s warnings, global batch and warmup share."""

import collections
from pathlib import Path

import pytest

from prefopt import disk
from prefopt.checkpoints import COMPLETE, checkpoints
from prefopt.config import build_config
from prefopt.errors import PrefoptError
from prefopt.explanation import explain
from prefopt.guidance import before_training
from prefopt.pipeline import train

Usage = collections.namedtuple("Usage", "total used free")
# what prefopt writes in output_dir before training (runs.commit and the lock)
BEFORE_TRAINING = {".prefopt.lock", "prefopt_run.json", "prefopt_config.yaml", "data_report.json",
                   "prefopt_provenance.json"}


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("disk", {"train": (8, 0), "test": (4, 1)}, chat=True, method="simpo", learning_rate=5e-3,
                     seed=5, max_steps=4, per_device_train_batch_size=2, logging_steps=1, save_steps=1,
                     report_to="none")


def _with_free_space(monkeypatch, share: float) -> list:
    """disk_usage reports `share` × what the run's estimate says it needs; returns the estimates."""
    seen, real = [], disk.estimate

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(disk, "estimate", spy)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10**12, 0, int(seen[-1].needed * share)))
    return seen


def test_refused_before_step_1_with_the_numbers_and_the_fixes(ws, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    seen = _with_free_space(monkeypatch, 0.9)
    with pytest.raises(PrefoptError) as refused:
        train(build_config({**ws.config, "output_dir": str(out)}), log=lambda *a: None)
    message, need = str(refused.value), seen[0]
    assert "will not fit" in message
    free = int(need.needed * 0.9)
    for number in (need.checkpoint, need.final, need.needed, free):
        assert f"{number / 1e9:.3g} GB" in message
    assert "save_total_limit 2" in message and f"up to {need.at_most} at once" in message
    for fix in ("save_total_limit", "save_only_model: true", "another disk"):
        assert fix in message
    # nothing of training was written, nothing of the user's removed
    assert {p.name for p in out.iterdir()} == BEFORE_TRAINING | {"notes.txt"}
    assert (out / "notes.txt").read_text() == "mine"
    # with room, the same command trains (the refused run's files do not stand in its way)
    monkeypatch.undo()
    result = train(build_config({**ws.config, "output_dir": str(out)}), log=lambda *a: None)
    assert result.trainer.state.global_step == 4


@pytest.mark.parametrize("peft", [False, True])
def test_a_warning_when_it_barely_fits_and_the_estimate_against_the_real_folders(ws, tmp_path, monkeypatch, peft):
    out = tmp_path / "run"
    seen = _with_free_space(monkeypatch, 1.1)  # fits, with less than MARGIN (1.2) to spare
    said = []
    keys = {"use_peft": True, "learning_rate": 1e-3} if peft else {}
    train(build_config({**ws.config, "output_dir": str(out), **keys}), log=said.append)
    need = seen[0]
    assert [line for line in said if "barely fit" in line] and any("save_total_limit" in line for line in said)
    # the default save_total_limit (2) is in effect: 4 saves, the newest 2 kept, 3 at the peak
    assert need.saves == 4 and need.kept == 2 and need.at_most == 3
    assert [c.name for c in checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    weights_file = "adapter_model.safetensors" if peft else "model.safetensors"
    for c in checkpoints(out):
        sizes = {p.name: p.stat().st_size for p in c.rglob("*") if p.is_file()}
        tensors = _tensor_count(c / weights_file)
        # safetensors: an 8-byte length and a JSON header, under 200 bytes per tensor (name, dtype, shape, offsets)
        assert 0 <= sizes[weights_file] - need.weights <= 8 + 200 * tensors
        # optimizer.pt (a zip of pickled state): 2 moments and a step per tensor, each a zip entry (local and
        # central headers ~ 76 bytes + its name twice, < 64 bytes of alignment) and its pickle record: < 400 bytes
        assert 0 <= sizes["optimizer.pt"] - need.optimizer <= 3 * 400 * tensors
        # the whole folder: the estimate is an upper bound, above it by at most the small files' allowance
        small = disk.SMALL + disk.LOG_LINE * 4
        assert sum(sizes.values()) <= need.checkpoint <= sum(sizes.values()) + small
        assert (c / COMPLETE).is_file()
    top = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert (out / weights_file).stat().st_size - need.weights <= 8 + 200 * tensors and need.final < top + disk.SMALL


def _tensor_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return len(list(f.keys()))


def test_counting_saves_and_what_is_on_disk_at_once():
    t = build_config({"method": "simpo", "max_steps": 5, "save_steps": 2}).training
    assert disk.count_saves(t, 5, 3, 0) == 3  # steps 2, 4 and the last, 5
    assert disk.count_saves(t, 5, 3, 4) == 1  # resumed from step 4
    t = build_config({"method": "simpo", "save_strategy": "epoch", "num_train_epochs": 3}).training
    assert disk.count_saves(t, 9, 3, 3) == 2
    assert disk.count_saves(build_config({"method": "simpo", "save_strategy": "no"}).training, 9, 3, 0) == 0
    one = dict(weights=100, optimizer=200, other=0, what="", final=100)
    assert disk.Estimate(saves=10, kept=2, best=False, present=0, **one).needed == 900  # 3 while the third is written
    assert disk.Estimate(saves=10, kept=2, best=True, present=0, **one).needed == 1200  # and the best one apart
    assert disk.Estimate(saves=1, kept=None, best=False, present=0, **one).needed == 400  # the final model beside it
    assert disk.Estimate(saves=3, kept=2, best=False, present=2, **one).needed == 300  # two already there
    assert disk.Estimate(saves=3, kept=None, best=False, present=0, **one).needed == 1000


def test_default_save_total_limit_in_effect_and_stated():
    cfg = build_config({"method": "simpo"})
    assert cfg.training.save_total_limit == 2
    assert "the newest 2 kept (prefopt's default; transformers keeps every one" in explain(cfg)
    given = build_config({"method": "simpo", "save_total_limit": 2})
    assert "newest 2 kept" in explain(given) and "prefopt's default" not in explain(given).split("checkpoints")[1]
    assert build_config({"method": "simpo", "save_total_limit": None}).training.save_total_limit is None
    assert "every one kept" in explain(build_config({"method": "simpo", "save_total_limit": None}))
    # not among a TRL config's differences (they say what its tool would have *trained*); the row says it
    trl = build_config({"loss_type": "simpo", "cpo_alpha": 0.0})
    assert not any("save_total_limit" in d for d in trl.differs) and "prefopt's default" in explain(trl)


def test_explain_prints_the_warnings_the_global_batch_and_the_warmup_share(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = build_config({"method": "simpo", "learning_rate": 1e-4, "per_device_train_batch_size": 2,
                        "gradient_accumulation_steps": 4, "warmup_ratio": 0.1, "max_steps": 50})
    text = explain(cfg, warnings=True)
    assert "2 per device × 4 accumulation × 1 process = 8 pairs per optimizer step (no launcher: WORLD_SIZE unset" in text
    assert "warmup 10% of steps, 5 of max_steps 50" in text
    warnings = before_training(cfg, 1)
    assert len(warnings) == 2  # the learning rate and the batch, from guidance, the code train prints them with
    after = text.split("warnings train would print:\n")[1].splitlines()
    assert after == [f"    - {w}" for w in warnings]
    quiet = build_config({"method": "simpo"})  # 8 per device × 16: 128 pairs (built before WORLD_SIZE is set:
    monkeypatch.setenv("WORLD_SIZE", "16")                                      # TrainingArguments would launch)
    text = explain(cfg, warnings=True)
    assert "2 per device × 4 accumulation × 16 processes = 128 pairs per optimizer step (WORLD_SIZE)" in text
    assert "effective batch" not in text and "learning_rate 0.0001 is above" in text  # 128: the papers' batch
    assert "warnings train would print: none" in explain(quiet, warnings=True)
    assert "warnings train would print" not in explain(cfg, processes=16)  # train prints them itself, after it
    monkeypatch.delenv("WORLD_SIZE")
    assert "warmup 3 steps" in explain(build_config({"method": "simpo", "warmup_steps": 3}))


def test_a_resumed_run_keeps_the_limit_it_started_with(tmp_path):
    """prefopt's default limit of 2 never rotates away the checkpoints of a run that began keeping
    them all (saved config without the key: a run from before the default; or null); a limit the
    config gives wins; a fresh run takes the default."""
    from prefopt.runs import Plan

    saved = tmp_path / "prefopt_config.yaml"
    said = []
    for started, expect in (("method: simpo\n", None), ("save_total_limit: null\n", None),
                            ("save_total_limit: 2\n", 2), ("save_total_limit: 5\n", 5)):
        saved.write_text(started)
        cfg = build_config({"method": "simpo"})
        disk.keep_run_limit(cfg, Plan(out=tmp_path, fresh=False), said.append)
        assert cfg.training.save_total_limit == expect, started
    assert said[0] == ("prefopt: resuming a run that kept every checkpoint: it goes on doing so "
                       "(set save_total_limit to change it).") and len(said) == 3
    given = build_config({"method": "simpo", "save_total_limit": 2})
    saved.write_text("method: simpo\n")
    disk.keep_run_limit(given, Plan(out=tmp_path, fresh=False), said.append)
    assert given.training.save_total_limit == 2
    fresh = build_config({"method": "simpo"})
    disk.keep_run_limit(fresh, Plan(out=tmp_path, fresh=True), said.append)
    assert fresh.training.save_total_limit == 2 and len(said) == 3


def test_an_8bit_optimizer_is_counted_in_bytes_and_a_ratio_save_steps_read_as_a_share():
    """8-bit moments are 1 byte each whatever the weights' dtype (fp32 weights: a quarter of Adam's
    state, not half), plus at most one 4-byte scale per 256 values; save_steps 0.05 is a share."""
    import types

    import torch

    model = torch.nn.Linear(16, 16)  # 272 fp32 parameters
    t = types.SimpleNamespace(save_only_model=False, optim="adamw_bnb_8bit")
    size, how = disk.optimizer_bytes(model, t, None, weights=272 * 4)
    assert size == int(2 * 272 * (1 + 4 / 256)) and "1-byte moments" in how
    t.optim = "adamw_torch"
    assert disk.optimizer_bytes(model, t, None, weights=272 * 4)[0] == 2 * 272 * 4
    ratio = build_config({"method": "simpo", "save_strategy": "steps", "save_steps": 0.05})
    assert "every 5% of the steps and at the end" in explain(ratio)
