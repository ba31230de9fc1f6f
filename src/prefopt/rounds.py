"""`prefopt iterate CONFIG.yaml --rounds K`: on-policy rounds, pairs → train → pairs from the new model.

    output_dir/round-1/pairs.jsonl      the policy's (model_name_or_path) answers, scored, as pairs
    output_dir/round-1/model/           trained on them (the config's training keys), from that policy
    output_dir/round-2/pairs.jsonl      round 1's model's answers ... and so on
    output_dir/round-K+1/pairs.jsonl    the last model's answers: its reward statistics (and the
                                        next round's pairs, should one follow)
    output_dir/iterate.json             each round's pair counts, reward statistics and metrics

Each round is an ordinary `prefopt pairs` and `prefopt train` run in its own folder, so a rerun of
the same command skips what is finished and resumes what is not. The training data of a round is
its pairs file; the config's held-out pairs (an eval split, `test_split_size`) are evaluated as in
any training run. A LoRA run continues its adapter from round to round (`existing_adapter:
continue`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import PrefoptError


def round_config(cfg, k: int, policy: str, pairs_file: Path):
    """Round k's training config: the user's keys, the policy, the round's pairs as training data
    and the config's held-out pairs as evaluation data."""
    from .config import build_config
    from .explanation import resolved_dict

    keys = resolved_dict(cfg)
    # the held-out sources alone, as resolved_dict writes them (a split not named like one marked eval)
    evals = resolved_dict(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_datasets=[])))
    keys.update({k: v for k, v in dataclasses.asdict(cfg.run).items()})  # not in resolved_dict: not the run's identity
    keys.update(model_name_or_path=policy, output_dir=str(Path(cfg.training.output_dir) / f"round-{k}" / "model"),
                datasets=[{"path": str(pairs_file)}] + evals.get("datasets", []))
    if k > 1 and cfg.model.use_peft:
        keys["existing_adapter"] = "continue"
    return build_config(keys, f"{cfg.source or 'config'} (round {k})")


def pairs_config(cfg, k: int, policy: str):
    """Round k's pairs run: the config's prompts and pairs keys, the round's policy and file."""
    out = Path(cfg.training.output_dir) / f"round-{k}" / "pairs.jsonl"
    model = dataclasses.replace(cfg.model, model_name_or_path=policy)
    if k > 1 and cfg.model.use_peft:
        model = dataclasses.replace(model, existing_adapter="continue")
    return dataclasses.replace(cfg, model=model, pairs=dataclasses.replace(cfg.pairs, output=str(out))), out


def iterate(cfg, rounds: int, log=print) -> dict:
    """K rounds (see the module's docstring); returns what iterate.json holds."""
    from .onpolicy import check_settings, make_pairs
    from .pipeline import train

    if rounds < 1:
        raise PrefoptError(f"--rounds {rounds}: run at least one round.")
    if cfg.pairs.output is not None:
        raise PrefoptError("prefopt iterate: output names one pairs file, but each round writes its own "
                           "(output_dir/round-K/pairs.jsonl); remove output.")
    check_settings(cfg)
    root = Path(cfg.training.output_dir)
    policy, summary = cfg.model.model_name_or_path, {"rounds": []}
    for k in range(1, rounds + 2):
        pcfg, pairs_file = pairs_config(cfg, k, policy)
        log(f"prefopt iterate: round {k}{' (the last model, scored)' if k > rounds else ''}: pairs from {policy}")
        made = make_pairs(pcfg, log=log)
        entry = {"round": k, "policy": policy, "pairs_file": str(pairs_file), "pairs": made.report["pairs"],
                 "dropped": made.report["dropped"], "reward": made.report["scores"]["all"],
                 "chosen_reward": made.report["scores"]["chosen"].get("mean"),
                 "rejected_reward": made.report["scores"]["rejected"].get("mean")}
        if k <= rounds:
            if not made.report["pairs"]:
                raise PrefoptError(f"round {k}: the policy's answers gave no pairs ({made.report['dropped']}); "
                                   "nothing to train on. Sample more answers (num_samples), lower min_score_gap, or "
                                   "use a graded scorer instead of a pass/fail one.")
            tcfg = round_config(cfg, k, policy, pairs_file)
            result = train(tcfg, log=log)
            entry.update(model=str(result.output_dir),
                         train={**_final(result.output_dir, "loss"), **_final(result.output_dir, "train_loss")},
                         eval=_final(result.output_dir, "eval_loss"))
            policy = str(result.output_dir)
        summary["rounds"].append(entry)
        (root / "iterate.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("\n".join(summary_table(summary)))
    return summary


def _final(output_dir: Path, key: str) -> dict:
    """The last logged line holding `key` in the run's metrics.jsonl (the final train or eval metrics)."""
    path = Path(output_dir) / "metrics.jsonl"
    last = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if key in entry:
                last = entry
    return {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_table(summary: dict) -> list[str]:
    """One line per round: pairs, the policy's mean reward, chosen/rejected rewards, the trained
    model's final train and held-out preference accuracy."""
    def num(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v)

    head = f"{'round':>5}  {'pairs':>6}  {'mean reward':>11}  {'chosen':>8}  {'rejected':>8}  {'train acc':>9}  " \
           f"{'eval acc':>8}  {'eval loss':>9}"
    lines = ["prefopt iterate: the policy of each round (its answers' rewards) and the model trained on them", head]
    for e in summary["rounds"]:
        train, evals = e.get("train", {}), e.get("eval", {})
        lines.append(f"{e['round']:>5}  {e['pairs']:>6}  {num(e['reward'].get('mean')):>11}  "
                     f"{num(e['chosen_reward']):>8}  {num(e['rejected_reward']):>8}  "
                     f"{num(train.get('rewards/accuracies'), '{:.3f}'):>9}  "
                     f"{num(evals.get('eval_rewards/accuracies'), '{:.3f}'):>8}  {num(evals.get('eval_loss')):>9}")
    return lines
