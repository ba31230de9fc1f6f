"""Warnings for regretted settings: before training from the config, while training from the
logged metrics. Each fires on its case and stays quiet on the papers' recipes."""

from types import SimpleNamespace

from prefopt.config import build_config
from prefopt.guidance import TELL_PAIRS, GuidanceCallback, _by_chance, before_training


def warnings_for(**keys):
    return before_training(build_config({"output_dir": "x", "report_to": "none", **keys}))


def test_the_papers_recipes_get_no_warning():
    assert warnings_for(method="simpo", beta=2.5, learning_rate=6e-7, per_device_train_batch_size=4,
                        gradient_accumulation_steps=32) == []
    assert warnings_for(method="orpo", learning_rate=8e-6, per_device_train_batch_size=8,
                        gradient_accumulation_steps=16) == []
    # LoRA wants larger learning rates
    assert warnings_for(method="cpo_simpo", learning_rate=1e-4, use_peft=True, per_device_train_batch_size=8,
                        gradient_accumulation_steps=16) == []


def test_each_regretted_setting_is_named_with_the_papers_range():
    (lr,) = warnings_for(method="simpo", learning_rate=5e-6, per_device_train_batch_size=8, gradient_accumulation_steps=16)
    assert "learning_rate 5e-06 is above what SimPO recipes use for full fine-tuning (3e-07–1e-06)" in lr
    (lr,) = warnings_for(method="cpo", learning_rate=1e-5, per_device_train_batch_size=8, gradient_accumulation_steps=16)
    assert "CPO recipes" in lr
    (beta,) = warnings_for(method="simpo", beta=0.1, learning_rate=5e-7, per_device_train_batch_size=8,
                           gradient_accumulation_steps=16)
    assert "beta 0.1 is below 1" in beta and "2–10" in beta
    (batch,) = warnings_for(method="orpo", learning_rate=8e-6, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert "effective batch 8" in batch and "papers' 128" in batch
    assert before_training(build_config({"output_dir": "x", "method": "orpo", "learning_rate": 8e-6,
                                         "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}),
                           world_size=8) == []  # 2 × 4 × 8 processes = 64


def _feed(lines, batch=32, eval_pairs=100):
    said = []
    callback = GuidanceCallback(said.append)
    args = SimpleNamespace(per_device_train_batch_size=batch, gradient_accumulation_steps=1, world_size=1)
    loader = SimpleNamespace(dataset=[None] * eval_pairs)
    for step, logs in lines:
        callback.on_log(args, SimpleNamespace(global_step=step), None, logs=logs, eval_dataloader=loader)
    return said


def test_a_trivial_tell_is_flagged_once():
    said = _feed([(1, {"rewards/accuracies": 0.9, "logps/chosen": -1.0}), (2, {"rewards/accuracies": 0.95,
                                                                             "logps/chosen": -1.0})])
    assert len(said) == 1 and "preference accuracy is 0.90 before any training" in said[0]
    assert _feed([(1, {"rewards/accuracies": 0.5, "logps/chosen": -1.0}), (2, {"rewards/accuracies": 0.9})]) == []
    assert "before any training" in _feed([(0, {"eval_rewards/accuracies": 0.85})])[0]  # eval_on_start


def test_a_handful_of_pairs_above_0_8_is_chance_not_a_tell():
    """5 of 5 pairs right happens by chance 1 time in 32; the warning waits for TELL_PAIRS (27) pairs,
    from which an accuracy above 0.8 comes by chance less than 1 time in 1,000."""
    assert TELL_PAIRS == 27 and _by_chance(5) == 1 / 32 and _by_chance(26) > 1e-3 > _by_chance(27)
    assert _feed([(1, {"rewards/accuracies": 1.0})], batch=4) == []  # 4 pairs
    assert _feed([(0, {"eval_rewards/accuracies": 1.0})], eval_pairs=5) == []
    assert len(_feed([(0, {"eval_rewards/accuracies": 0.9})], eval_pairs=27)) == 1
    assert len(_feed([(7, {"rewards/accuracies": 0.9})], batch=4)) == 1  # 7 steps × 4 pairs = 28


def test_steadily_falling_chosen_logps_are_flagged():
    falling = [(s, {"logps/chosen": -1.0 - 0.05 * s, "rewards/accuracies": 0.5}) for s in range(1, 12)]
    said = _feed(falling)
    assert len(said) == 1 and "likelihood displacement" in said[0] and "fell in 9 of the last 9" in said[0]
    noisy = [(s, {"logps/chosen": -1.0 + (0.05 if s % 2 else -0.05), "rewards/accuracies": 0.5}) for s in range(1, 30)]
    assert _feed(noisy) == []
