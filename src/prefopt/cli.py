"""The command line: a table of plain functions.

    prefopt train [CONFIG.yaml] [--key value ...]     (no config: the offline demo)
    prefopt config explain CONFIG.yaml [--key value ...]
    prefopt data CONFIG.yaml [--examples N] [--output FILE] [--key value ...]
    prefopt pairs CONFIG.yaml [--key value ...]       (on-policy pairs: sample, score, keep best and worst)
    prefopt iterate CONFIG.yaml --rounds K [--key value ...]   (pairs -> train -> pairs from the new model ...)
    prefopt sweep CONFIG.yaml --learning_rate A,B,C [--gamma_beta_ratio ...] [--stages lr,...] [--key value ...]
    prefopt sweep --report DIR
    prefopt merge ADAPTER_DIR --output DIR [--base BASE] [--dtype bfloat16]
    prefopt eval --model DIR [--model DIR2 ...] [--data PAIRS] [--prompts FILE] ...
    prefopt generate --model DIR [--prompt TEXT ...] [--prompts FILE] ...
    prefopt plot OUTPUT_DIR
    prefopt push OUTPUT_DIR --repo_id ID [--private BOOL] [--revision BRANCH] [--token TOKEN]
    prefopt COMMAND --help                            (every command)
    python -m prefopt ...                             (the same)

`train`, `config explain`, `data`, `pairs` and `iterate` take any config key as `--key value`, checked against the
schema by config.py (`data` takes its own --examples and --output out first, `iterate` its --rounds); the other
commands (`commands`: merge, eval, generate, plot, push) have fixed options, parsed by argparse (`cliparse._Parser`), whose errors are PrefoptErrors like
any other: one line naming the command, then its usage, exit 2.
"""

import os
import sys

from .cliparse import OVERRIDES, _count, _Exit, _help_only, _own_options, _Parser, boolean  # noqa: F401 (re-exported)
from .commands import _quiet, cmd_eval, cmd_generate, cmd_merge, cmd_plot, cmd_push
from .errors import PrefoptError, Stopped

USAGE = """usage:
  prefopt train [CONFIG.yaml] [--key value ...]   train (no config: the built-in offline demo)
  prefopt config explain CONFIG.yaml [--key value ...]
                                                  print the resolved objective and settings
  prefopt config keys [--section S]               every config key: type, default, help
  prefopt data CONFIG.yaml [--examples N] [--output FILE] [--key value ...]
                                                  the data report and N decoded pairs, no model loaded
  prefopt pairs CONFIG.yaml [--key value ...]     the policy's own answers, scored, as a pairs file for train
  prefopt iterate CONFIG.yaml --rounds K [--key value ...]
                                                  on-policy rounds: pairs, train, pairs from the new model, ...
  prefopt sweep CONFIG.yaml --learning_rate A,B,C [--gamma_beta_ratio X,Y] [--stages lr,gamma_beta_ratio]
                                                  a grid or staged search of trials, the best chosen on held-out pairs
  prefopt merge ADAPTER_DIR --output DIR [--base BASE] [--dtype DTYPE]
                                                  fold a LoRA adapter into its base; save a full model
  prefopt plot OUTPUT_DIR                         PNGs of a run's metrics (OUTPUT_DIR/plots)
  prefopt push OUTPUT_DIR --repo_id ID [--private BOOL] [--revision BRANCH]
                                                  upload a finished run (model, tokenizer, card, plots) to the Hub
  prefopt eval --model DIR [--model DIR2] [--data PAIRS] [--prompts FILE] [--reward_model DIR]
                                                  preference and generation metrics, side by side
  prefopt generate --model DIR [--prompt TEXT | --prompts FILE]
                                                  answer prompts (none given: an interactive chat)
Any config key can be given or overridden as --key value. prefopt COMMAND --help: its options."""



def _config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("--"):
        return args[0], args[1:]
    return None, args


def _train_parser() -> _Parser:
    parser = _Parser("train", "Train on a config; with neither a config nor options, the built-in offline demo.",
                     usage="%(prog)s [CONFIG.yaml] [--key value ...]", epilog=OVERRIDES)
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the run's config (YAML)")
    return parser


def cmd_train(args: list[str]) -> int:
    if _help_only(_train_parser(), args):
        return 0
    path, overrides = _config_and_overrides(args)
    if path is None and not overrides:
        from .demo import run_demo

        run_demo()
        return 0
    from .config import load_config
    from .pipeline import train

    train(load_config(path, overrides))
    return 0


def _config_parser() -> _Parser:
    parser = _Parser("config", "Inspect a config without loading a model or data.",
                     usage="%(prog)s explain CONFIG.yaml [--key value ...]\n       %(prog)s keys [--section S]",
                     epilog=OVERRIDES)
    parser.add_argument("explain", help="print the objective and settings CONFIG.yaml resolves to "
                                        "(`prefopt config keys [--section S]`: every key, its type, default and help)")
    parser.add_argument("config", metavar="CONFIG.yaml", help="the config (YAML)")
    return parser


def cmd_config(args: list[str]) -> int:
    if args and args[0] == "keys":  # before --help: `config keys --help` is the subcommand's own
        return _config_keys(args[1:])
    if _help_only(_config_parser(), args):
        return 0
    if not args or args[0] != "explain":
        raise PrefoptError("usage: prefopt config explain CONFIG.yaml [--key value ...] | prefopt config keys "
                           "[--section S]")
    from .config import explain, load_config

    path, overrides = _config_and_overrides(args[1:])
    if path is None and not overrides:
        raise PrefoptError("prefopt config explain: name a config file.")
    print(explain(load_config(path, overrides), warnings=True))
    return 0


# explanation.KEY_SECTIONS, spelt here so that `config keys --help` imports nothing heavy (a test holds them equal)
KEY_SECTIONS = ("model", "data", "objective", "run", "pairs", "training")


def _config_keys(args: list[str]) -> int:
    parser = _Parser("config keys", "Every config key: its type, default and help.")
    parser.add_argument("--section", choices=KEY_SECTIONS, help="only this section's keys")
    section = parser.parse_args(args).section
    from .explanation import config_keys

    print(config_keys(section))
    return 0


def _data_parser() -> _Parser:
    parser = _Parser("data", "Run the data pipeline only (the tokenizer loads, no model weights): print the data\n"
                             "report train prints and the first train pairs as the trainer gets them (the scored\n"
                             "part marked), and write the same to output_dir/data_preview.txt.",
                     usage="%(prog)s CONFIG.yaml [--examples N] [--output FILE] [--key value ...]", epilog=OVERRIDES)
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the run's config (YAML)")
    parser.add_argument("--examples", type=_count, default=3, metavar="N",
                        help="decoded train pairs to show (default 3)")
    parser.add_argument("--output", metavar="FILE",
                        help="write the preview here (default: output_dir/data_preview.txt)")
    return parser

def cmd_data(args: list[str]) -> int:
    parser = _data_parser()
    if _help_only(parser, args):
        return 0
    own, overrides = _own_options(args, ("--examples", "--output"))  # every other --key is a config key
    path, overrides = _config_and_overrides(overrides)
    options = parser.parse_args(([path] if path else []) + own)
    _quiet()
    if path is None and not overrides:
        parser.error("name a config file")
    from .config import load_config
    from .preview import data_preview

    data_preview(load_config(path, overrides), examples=options.examples, output=options.output)
    return 0


def _pairs_parser() -> _Parser:
    return _Parser("pairs", "Sample num_samples answers per prompt from the policy (model_name_or_path), score each "
                   "(reward_model or reward_function), and write the best and the worst as a pair: a file `prefopt "
                   "train` reads as it stands. Resumes where a killed run stopped; under torchrun the processes "
                   "share the prompts. The keys: `prefopt config keys --section pairs`.",
                   usage="%(prog)s CONFIG.yaml [--key value ...]", epilog=OVERRIDES)


def cmd_pairs(args: list[str]) -> int:
    if _help_only(_pairs_parser(), args):
        return 0
    path, overrides = _config_and_overrides(args)
    if path is None and not overrides:
        _pairs_parser().error("name a config file")
    _quiet()
    from .config import load_config
    from .onpolicy import make_pairs

    make_pairs(load_config(path, overrides, objective_optional=True))
    return 0


def _iterate_parser() -> _Parser:
    parser = _Parser("iterate", "On-policy rounds: pairs from the policy (prefopt pairs), training on them (prefopt "
                     "train), pairs from the new model, and so on; each round in output_dir/round-K/, a table of "
                     "every round's rewards and metrics at the end (output_dir/iterate.json). A rerun skips what is "
                     "finished and resumes what is not.",
                     usage="%(prog)s CONFIG.yaml --rounds K [--key value ...]", epilog=OVERRIDES)
    parser.add_argument("config", metavar="CONFIG.yaml", help="a training config with the pairs keys")
    parser.add_argument("--rounds", type=_count, required=True, help="how many rounds of pairs and training")
    return parser


def cmd_iterate(args: list[str]) -> int:
    parser = _iterate_parser()
    if _help_only(parser, args):
        return 0
    own, overrides = _own_options(args, ("--rounds",))
    path, overrides = _config_and_overrides(overrides)
    options = parser.parse_args(([path] if path else []) + own)
    _quiet()
    from .config import load_config
    from .rounds import iterate

    iterate(load_config(path, overrides), options.rounds)
    return 0

def _sweep_parser() -> _Parser:
    from .sweep import Options
    from .sweepjudge import METRICS

    d = Options()
    parser = _Parser("sweep", "Train one trial per setting (any numeric key given a comma-separated list), each an "
                     "ordinary run in output_dir/trials/, and choose the best on held-out pairs; the whole grid, or "
                     "stage by stage (--stages: each stage fixes the best of the one before). A rerun skips finished "
                     "trials and resumes the others; several processes on one output_dir share the grid.",
                     usage="%(prog)s CONFIG.yaml --learning_rate A,B,C [--gamma_beta_ratio X,Y] [--stages KEYS] "
                           "[--key value ...] | %(prog)s --report DIR", epilog=OVERRIDES)
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the trials' training config")
    parser.add_argument("--stages", help="comma-separated swept keys in the order to tune them, one stage each "
                        "(lr = learning_rate), e.g. lr,gamma_beta_ratio,beta; unset: the whole grid")
    parser.add_argument("--metric", default=d.metric, choices=list(METRICS),
                        help="what chooses the best trial (default accuracy: held-out preference accuracy, ties by "
                             "margin; eval_loss: the lowest; win_rate / mean_reward: --reward_model on --prompts)")
    parser.add_argument("--max_chosen_logp_drop", type=float, default=d.max_chosen_logp_drop,
                        help="a trial whose held-out chosen log-prob per token fell by more nats is collapsed, never "
                             f"chosen (default {d.max_chosen_logp_drop})")
    parser.add_argument("--max_repetition", type=float, default=d.max_repetition,
                        help=f"a trial whose answers' repetition rate (repeated 3-grams) is above this is "
                             f"degenerate, never chosen (default {d.max_repetition})")
    parser.add_argument("--prompts", help="prompts each trial answers (as prefopt eval's --prompts) for the "
                        "repetition guard and the reward model; unset: the last evaluation's generations")
    parser.add_argument("--reward_model", help="a sequence-classification reward model judging the answers")
    parser.add_argument("--report", metavar="DIR", help="draw a sweep's table and PNGs again from DIR/sweep.json")
    return parser


SWEEP_OPTIONS = ("--stages", "--metric", "--max_chosen_logp_drop", "--max_repetition", "--prompts",
                 "--reward_model", "--report")


def cmd_sweep(args: list[str]) -> int:
    parser = _sweep_parser()
    if _help_only(parser, args):
        return 0
    own, overrides = _own_options(args, SWEEP_OPTIONS)
    path, overrides = _config_and_overrides(overrides)
    options = parser.parse_args(([path] if path else []) + own)
    _quiet()
    from .sweep import Options, plan_sweep, run_sweep

    if options.report:
        if path or overrides:
            raise PrefoptError("prefopt sweep --report DIR redraws a finished sweep; give it no config or keys.")
        from .sweepreport import redraw

        redraw(options.report)
        return 0
    if path is None:
        raise PrefoptError("prefopt sweep: give the trials' config (CONFIG.yaml), or --report DIR.")
    chosen = Options(metric=options.metric, stages=options.stages.split(",") if options.stages else None,
                     max_chosen_logp_drop=options.max_chosen_logp_drop, max_repetition=options.max_repetition,
                     reward_model=options.reward_model, prompts=options.prompts)
    run_sweep(plan_sweep(path, overrides, chosen))
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "config": cmd_config, "data": cmd_data, "pairs": cmd_pairs, "iterate": cmd_iterate, "merge": cmd_merge, "plot": cmd_plot, "eval": cmd_eval,
            "generate": cmd_generate, "push": cmd_push}


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher (and torch.distributed.launch) put `--local_rank=N` first on the command
    line; the rank comes from the LOCAL_RANK variable the launcher also sets."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = _drop_local_rank(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"prefopt {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"prefopt: unknown command {argv[0]!r}.{hint}\n{USAGE}", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")  # under a launcher, say which process it was
    had_group = _process_group_open()
    try:
        return _run(command, argv[1:], rank)
    finally:
        if not had_group and _process_group_open():
            sys.modules["torch"].distributed.destroy_process_group()


def _process_group_open() -> bool:
    """Whether a torch.distributed process group is open. One a command started is closed before
    the interpreter exits: left open, gloo's threads are torn down at exit and a process that ended
    cleanly (0, or 2 on a PrefoptError) aborted now and then instead ("terminate called without an
    active exception", exit -6 under torchrun)."""
    torch = sys.modules.get("torch")  # imported by the command if it needed a process group
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def _run(command, args: list[str], rank: str) -> int:
    try:
        return command(args)
    except _Exit as e:
        return e.status
    except PrefoptError as e:
        if e.echo:
            print(f"prefopt: error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if rank == "0":
            print(f"prefopt: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if rank == "0":
            print("prefopt: interrupted (Ctrl-C).", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`prefopt config explain | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's flush at exit is quiet
        return 141  # as a shell reports a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
