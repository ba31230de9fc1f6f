"""`prefopt sweep CONFIG.yaml --learning_rate 3e-7,5e-7,1e-6 --gamma_beta_ratio 0.3,0.5,0.8 [--stages lr,...]`

Any numeric key given as a comma-separated list is swept; every other `--key value` applies to all
trials. Without `--stages` the whole grid runs (one Optuna study); with it, stage by stage as the
SimPO authors tune — learning rate first, then γ/β, then β — each stage sweeping its key with the
earlier stages' best values fixed and the later keys at the config's values.

    output_dir/trials/learning_rate=5e-07,gamma_beta_ratio=0.5/   one ordinary training run per trial
    output_dir/sweep.journal        the studies (Optuna's journal storage: settings, state, metric)
    output_dir/claims/NAME.lock     held by the process training that trial (the kernel drops it)
    output_dir/sweep.json, sweep.md and plots/sweep_*.png   (sweepreport)

A trial's name is its settings, every swept key included (a key not swept yet at the config's
value), so a stage-2 trial equal to a stage-1 trial is that same finished run, not trained again.
Each trial is an ordinary `prefopt train` run in its folder: a rerun of the sweep skips what is
finished and resumes what is not (from its last checkpoint), and several `prefopt sweep` processes
on one output_dir (one per GPU: CUDA_VISIBLE_DEVICES) share the grid, each claiming the next trial.

Optuna is the search machinery: its GridSampler enumerates the grid (and hands concurrent workers
different points) and its JournalStorage keeps the studies in one append-only file, locked for
concurrent writers, so a sweep resumes with no database server; prefopt judges and selects.

Selection (`--metric`): held-out preference accuracy by default (ties: the larger held-out margin),
`eval_loss` (lowest), or, with `--reward_model DIR --prompts FILE`, `win_rate` (each trial's answers
against the base model's, judged by the reward model) or `mean_reward`. A trial is never chosen
when it diverged (a non-finite step), collapsed (its held-out chosen log-prob per token fell by more
than `--max_chosen_logp_drop` nats below the value before training: likelihood displacement), or
degenerated (the repetition rate of its answers — the last evaluation's generations, or the answers
to --prompts — above `--max_repetition`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import NonFinite, PrefoptError
from .sweepjudge import METRICS, choose, judge

SWEEP_FILE, JOURNAL, TRIALS, CLAIMS = "sweep.json", "sweep.journal", "trials", "claims"
STAGE_NAMES = {"lr": "learning_rate", "gamma": "gamma_beta_ratio", "gbr": "gamma_beta_ratio"}
FORCED = {"eval_on_start": "true", "generate_during_eval": "true"}  # the guards' before-and-after numbers
GUARD_PROMPTS = 16  # eval_generation_prompts unless the config sets it
POLL_S = 10.0


@dataclasses.dataclass
class Options:
    metric: str = "accuracy"
    stages: list[str] | None = None
    max_chosen_logp_drop: float = 1.0
    max_repetition: float = 0.5
    reward_model: str | None = None
    prompts: str | None = None


@dataclasses.dataclass
class Plan:
    config: str | None
    rest: list[str]  # the --key value overrides every trial gets
    lists: dict[str, list[float]]  # swept key -> its values, as given
    stages: list[list[str]]  # the keys each stage sweeps (the grid: one stage, every key)
    base: dict  # every swept key's value in the config
    options: Options
    root: Path
    identity: dict  # what a rerun must match: the config, the lists, the stages

    def trial_dir(self, settings: dict) -> Path:
        return self.root / TRIALS / trial_name(settings)


def trial_name(settings: dict) -> str:
    return ",".join(f"{k}={_text(v)}" for k, v in settings.items())


def _text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else repr(float(value))


def read_lists(overrides: list[str]) -> tuple[dict[str, list[float]], list[str]]:
    """The swept keys (a numeric key given a comma-separated list) apart from the other overrides."""
    from .dialects import RENAMES
    from .values import FIELD_TYPES
    from .yamlfile import override_pairs

    lists, rest = {}, []
    for key, value, args in override_pairs(overrides):
        if value is None or "," not in value:
            rest += args
            continue
        name = RENAMES.get(key, key)
        kinds = _numeric(FIELD_TYPES.get(name))
        if kinds is None:
            raise PrefoptError(f"--{key} {value}: only a numeric key can be swept (learning_rate, beta, "
                               "gamma_beta_ratio, nll_weight, ...); give it one value.")
        values = []
        for part in value.split(","):
            try:
                number = float(part)
            except ValueError:
                raise PrefoptError(f"--{key} {value}: {part.strip()!r} is not a number.") from None
            if float not in kinds and not number.is_integer():
                raise PrefoptError(f"--{key} {value}: {part.strip()!r} is not a whole number.")
            values.append(number if float in kinds else int(number))
        if len(set(values)) < len(values):
            raise PrefoptError(f"--{key} {value}: a value is listed twice.")
        if name in lists:
            raise PrefoptError(f"--{key}: {name} is swept twice (under two spellings); give it once.")
        lists[name] = values
    return lists, rest


def _numeric(kind) -> set | None:
    import typing

    kinds = set(typing.get_args(kind)) or {kind}
    kinds.discard(type(None))
    return kinds if kinds and kinds <= {int, float} else None


def plan_sweep(config: str | None, overrides: list[str], options: Options) -> Plan:
    """Read the sweep's command line and check every trial's config before anything trains."""
    from .config import load_config
    from .explanation import resolved_dict
    from .yamlfile import read_yaml

    if options.metric not in METRICS:
        raise PrefoptError(f"--metric {options.metric}: choose one of {', '.join(METRICS)}.")
    if options.metric in ("win_rate", "mean_reward") and not (options.reward_model and options.prompts):
        raise PrefoptError(f"--metric {options.metric} judges answers: give --reward_model DIR and --prompts FILE.")
    if bool(options.reward_model) != bool(options.prompts) and options.reward_model:
        raise PrefoptError("--reward_model judges the answers to --prompts: give --prompts FILE too.")
    lists, rest = read_lists(overrides)
    if not lists:
        raise PrefoptError("prefopt sweep: nothing to sweep. Give a key a comma-separated list, e.g. "
                           "--learning_rate 3e-7,5e-7,1e-6 --gamma_beta_ratio 0.3,0.5,0.8.")
    stages = _stages(options.stages, lists)
    given = set(read_yaml(config) if config else {}) | {a[2:].partition("=")[0] for a in rest if a.startswith("--")}
    if "eval_generation_prompts" not in given:
        rest = rest + ["--eval_generation_prompts", str(GUARD_PROMPTS)]
    cfg = load_config(config, rest + _forced())
    resolved = resolved_dict(cfg)
    base = {k: _value(cfg, k) for k in lists}
    root = Path(cfg.training.output_dir)
    identity = {"config": json.loads(json.dumps({k: v for k, v in resolved.items() if k != "output_dir"},
                                                default=str)),
                "lists": lists, "stages": stages}
    plan = Plan(config, rest, lists, stages, base, options, root, identity)
    for settings in itertools.product(*lists.values()):  # each value checked now, not after hours of trials
        trial_config(plan, dict(zip(lists, settings)))
    if cfg.training.world_size > 1:
        raise PrefoptError("prefopt sweep runs its trials one after another in each process; under a launcher "
                           "every process would train a different trial. Start one `prefopt sweep` per GPU "
                           "instead (CUDA_VISIBLE_DEVICES=0, 1, ...) on the same output_dir: they share the grid.")
    if (root / "prefopt_run.json").exists():
        raise PrefoptError(f"output_dir {root} holds a training run, not a sweep: give the sweep its own "
                           "output_dir (its trials go in output_dir/trials/).")
    return plan


def _value(cfg, key: str):
    """The config's value of a swept key (the trials' name for it until its stage)."""
    for section in (cfg.objective, cfg.data, cfg.model, cfg.training):
        if hasattr(section, key):
            return getattr(section, key)
    raise PrefoptError(f"--{key}: not a key of this run's config; sweep keys the run uses.")


def _stages(names: list[str] | None, lists: dict) -> list[list[str]]:
    if not names:
        return [list(lists)]
    keys = [STAGE_NAMES.get(n, n) for n in names]
    missing = [k for k in keys if k not in lists]
    if missing:
        raise PrefoptError(f"--stages names {missing[0]}, which has no list of values: give it one "
                           f"(--{missing[0]} a,b,c) or leave it out of --stages.")
    left = [k for k in lists if k not in keys]
    if left or len(set(keys)) < len(keys):
        raise PrefoptError(f"--stages {','.join(names)}: name each swept key once "
                           f"({'missing: ' + ', '.join(left) if left else 'one is named twice'}).")
    return [[k] for k in keys]


def _forced() -> list[str]:
    return [a for k, v in FORCED.items() for a in (f"--{k}", v)]


def trial_config(plan: Plan, settings: dict):
    from .config import load_config

    values = [a for k, v in settings.items() for a in (f"--{k}", _text(v))]
    out = ["--output_dir", str(plan.trial_dir({**plan.base, **settings}))]
    return load_config(plan.config, plan.rest + _forced() + values + out)


# -- running the studies ----------------------------------------------------------------------

def run_sweep(plan: Plan, log=print) -> dict:
    """Every stage's trials (module docstring); returns what sweep.json holds."""
    from .sweepreport import write_report

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan.root.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(plan.root / JOURNAL)))
    log(f"prefopt sweep: {' then '.join('/'.join(s) for s in plan.stages)} "
        f"({'stage by stage' if len(plan.stages) > 1 else 'the whole grid'}) in {plan.root}; every trial evaluates "
        f"before its first step and generates at each evaluation (eval_on_start, generate_during_eval): the "
        f"guards compare before and after. Selection: {plan.options.metric}.")
    fixed, records = {}, []
    for number, keys in enumerate(plan.stages, 1):
        space = {k: plan.lists[k] for k in keys}
        stage = _open_study(optuna, storage, plan, number, space, fixed)
        records += _run_stage(optuna, stage, plan, number, space, fixed, log)
        best = choose([r for r in records if r["stage"] == number], plan.options.metric)
        if best is None:
            summary = _summary(plan, records, None)
            write_report(plan.root, summary, log)
            raise PrefoptError(f"stage {number} ({'/'.join(keys)}): no trial can be chosen — every one diverged, "
                               f"collapsed or degenerated (see {plan.root / 'sweep.md'}). Try smaller values.")
        fixed.update({k: best["settings"][k] for k in keys})
        write_report(plan.root, _summary(plan, records, None), log=None)
    summary = _summary(plan, records, choose(records, plan.options.metric))
    write_report(plan.root, summary, log)
    return summary


def _open_study(optuna, storage, plan: Plan, number: int, space: dict, fixed: dict):
    name = f"stage-{number}" if len(plan.stages) > 1 else "grid"
    sampler = optuna.samplers.GridSampler(space, seed=0)
    direction = METRICS[plan.options.metric][1]
    try:  # (create_study's load_if_exists would append a record to the journal on every rerun)
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction=direction)
    want = {"identity": plan.identity, "fixed": fixed}
    have = {k: study.user_attrs.get(k) for k in want}
    if have["identity"] is None:
        for k, v in want.items():
            study.set_user_attr(k, v)
    elif json.dumps(have, sort_keys=True) != json.dumps(want, sort_keys=True):
        raise PrefoptError(_mismatch(plan.root, have, want, name))
    # Results are told through a second handle: GridSampler's after_trial stops the study once the
    # grid is covered, which outside study.optimize raises; the claim logic here does that job.
    teller = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    return study, teller


def _mismatch(root: Path, have: dict, want: dict, name: str) -> str:
    if have["identity"] == want["identity"]:
        return (f"{root}: the sweep's {name} ran with {have['fixed']} from the stages before it, which now choose "
                f"{want['fixed']} (another --metric or guard?). Rerun with the sweep's first settings, or sweep "
                "into another output_dir.")
    old, new = have["identity"], want["identity"]
    keys = sorted(k for k in set(old["config"]) | set(new["config"]) if old["config"].get(k) != new["config"].get(k))
    keys += [f"--{k}" for k in set(old["lists"]) | set(new["lists"]) if old["lists"].get(k) != new["lists"].get(k)]
    keys += ["--stages"] if old["stages"] != new["stages"] else []
    return (f"{root} holds another sweep (it differs in {', '.join(keys) or 'its settings'}); nothing was changed. "
            "Rerun it as it was started, or give this sweep another output_dir.")


def _run_stage(optuna, handles, plan: Plan, number: int, space: dict, fixed: dict, log) -> list:
    study, teller = handles
    records = []
    while True:
        with _claim_next(optuna, study, plan, space, fixed) as claimed:
            if claimed == "wait":
                log(f"prefopt sweep: waiting for the trials other processes are training (stage {number})")
            elif claimed is not None:
                trial_number, settings = claimed
                records.append(run_trial(teller, trial_number, plan, number, settings, log))
                continue
        if claimed is None:
            break
        time.sleep(POLL_S)
    finished = {r["name"] for r in records}
    for t in study.get_trials(deepcopy=False):  # those other processes trained
        settings = {**plan.base, **fixed, **t.params}
        if t.state.is_finished() and trial_name(settings) not in finished:
            error = study.user_attrs.get(f"error {trial_name(settings)}")
            records.append(judge(plan, number, settings, trial_config(plan, settings), error))
            finished.add(records[-1]["name"])
    return records


@contextmanager
def _claim_next(optuna, study, plan: Plan, space: dict, fixed: dict):
    """(trial number, settings) of a trial this process now holds (its claim lock), "wait" while
    the rest are held by other processes, None when the stage is done. Under the sweep's lock, so
    two processes never take the same trial."""
    running = optuna.trial.TrialState.RUNNING
    with _flock(plan.root / CLAIMS / ".sweep.lock", wait=True):
        trials = study.get_trials(deepcopy=False)
        done = {tuple(t.params.get(k) for k in space) for t in trials if t.state.is_finished()}
        stale = None
        for t in trials:
            if t.state == running and len(t.params) == len(space):
                lock = _try_flock(plan.root / CLAIMS / f"{trial_name({**plan.base, **fixed, **t.params})}.lock")
                if lock is not None:
                    stale = (t.number, t.params, lock)
                    break
        if stale is None:
            taken = {tuple(t.params.get(k) for k in space) for t in trials if t.state == running}
            if not set(itertools.product(*space.values())) - done - taken:
                claim = "wait" if taken else None
                yield claim
                return
            trial = study.ask()
            params = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
            lock = _try_flock(plan.root / CLAIMS / f"{trial_name({**plan.base, **fixed, **params})}.lock")
            stale = (trial.number, params, lock)
    number, params, lock = stale
    try:
        yield number, {**fixed, **params}
    finally:
        if lock is not None:
            lock.close()


@contextmanager
def _flock(path: Path, wait: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fh


def _try_flock(path: Path):
    """The open, locked file, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 (held while the trial trains)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def run_trial(study, number: int, plan: Plan, stage: int, settings: dict, log) -> dict:
    """Train one trial (or find it finished), judge it and tell the study."""
    import optuna

    from .pipeline import train

    full = {**plan.base, **settings}
    cfg = trial_config(plan, settings)
    log(f"prefopt sweep: stage {stage}, trial {trial_name(full)}")
    error = None
    try:
        train(cfg, log=log)
    except NonFinite as e:
        error = str(e)
    record = judge(plan, stage, full, cfg, error)
    if error is not None:  # kept for a rerun or another process, which judge the trial from its folder
        study.set_user_attr(f"error {record['name']}", error)
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    else:
        value = record["metrics"].get(METRICS[plan.options.metric][0])
        study.tell(number, value if value is not None and math.isfinite(value) else None,
                   state=None if value is not None and math.isfinite(value) else optuna.trial.TrialState.FAIL)
    return record


def _summary(plan: Plan, records: list[dict], best: dict | None) -> dict:
    def order(r):  # the table in the order the values were given, stage by stage
        return r["stage"], [plan.lists[k].index(r["settings"][k]) if r["settings"][k] in plan.lists[k] else -1
                            for k in plan.lists]

    seen, trials = set(), []
    for r in sorted(records, key=order):  # a stage-2 trial equal to a stage-1 trial is listed once, under its first stage
        if r["name"] not in seen:
            seen.add(r["name"])
            trials.append(r)
    return {"metric": plan.options.metric, "swept": plan.lists, "stages": plan.stages,
            "guards": {"max_chosen_logp_drop": plan.options.max_chosen_logp_drop,
                       "max_repetition": plan.options.max_repetition},
            "trials": trials,
            "best": None if best is None else {"settings": best["settings"], "trial": best["name"],
                                               "output_dir": best["output_dir"], "metrics": best["metrics"]}}
