"""The command line: a table of plain functions.

    prefopt train [CONFIG.yaml] [--key value ...]     (no config: the offline demo)
    prefopt config explain CONFIG.yaml [--key value ...]
    prefopt data CONFIG.yaml [--examples N] [--output FILE] [--key value ...]
    prefopt pairs CONFIG.yaml [--key value ...]       (on-policy pairs: sample, score, keep best and worst)
    prefopt iterate CONFIG.yaml --rounds K [--key value ...]   (pairs -> train -> pairs from the new model ...)
    prefopt merge ADAPTER_DIR --output DIR [--base BASE] [--dtype bfloat16]
    prefopt eval --model DIR [--model DIR2 ...] [--data PAIRS] [--prompts FILE] ...
    prefopt generate --model DIR [--prompt TEXT ...] [--prompts FILE] ...
    prefopt plot OUTPUT_DIR
    prefopt push OUTPUT_DIR --repo_id ID [--private BOOL] [--revision BRANCH] [--token TOKEN]
    prefopt COMMAND --help                            (every command)
    python -m prefopt ...                             (the same)

`train`, `config explain`, `data` and `pairs` take any config key as `--key value`, checked against the
schema by config.py (`data` takes its own --examples and --output out first); the other
commands have fixed options, parsed by argparse (`_Parser`), whose errors are PrefoptErrors like
any other: one line naming the command, then its usage, exit 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path

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

OVERRIDES = """\
Any config key can be given or overridden as --key value (or --key=value), in prefopt's
spelling or another tool's (TRL, the SimPO repository, alignment-handbook). Keys are checked
against the schema, a misspelt one refused with the nearest name; `prefopt config explain`
prints what they resolve to."""


class _Exit(Exception):
    """argparse has printed --help: the command ends with this status."""

    def __init__(self, status: int):
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse the prefopt way: a bad option is a PrefoptError naming the command, with its usage
    (exit 2, no traceback); --help prints and the command returns 0. Options are spelt out in
    full (no abbreviations), as config keys are."""

    def __init__(self, command: str, description: str, **kwargs):
        self.known = set()  # every option's spellings, filled by add_argument (also argparse's own -h)
        super().__init__(prog=f"prefopt {command}", description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def add_argument(self, *names, **kwargs):
        self.known.update(names)
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args: list[str]) -> argparse.Namespace:
        # an unknown option is named before a missing one: `--out o` is a misspelt --output
        unknown = [a for a in args if a.startswith("--") and a.partition("=")[0] not in self.known]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(args)

    def error(self, message: str):
        raise PrefoptError(f"{self.prog}: {message}.\n{self.format_usage().rstrip()}")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


def boolean(value: str) -> bool:
    """true/false, 1/0, yes/no in any case; anything else is refused, never read as False."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true or false (or 1/0, yes/no)")


def _help_only(parser: _Parser, args: list[str]) -> bool:
    """For the commands whose --key value options are free-form: print the help if asked."""
    if "-h" in args or "--help" in args:
        parser.print_help()
        return True
    return False


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


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 0")
    return int(value)


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


def _own_options(args: list[str], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """A command's own `--name value` options apart from the config's free-form `--key value`s."""
    own, rest = [], []
    i = 0
    while i < len(args):
        name = args[i].partition("=")[0]
        takes = 1 if name in names and "=" not in args[i] else 0
        (own if name in names else rest).extend(args[i:i + 1 + takes])
        i += 1 + takes
    return own, rest


def _quiet(models: list[str] = ()):
    from .console import quiet_command

    quiet_command(models)


def cmd_merge(args: list[str]) -> int:
    parser = _Parser("merge", "Fold a LoRA adapter into its base model and save the full model.")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a folder holding adapter_config.json")
    parser.add_argument("--output", required=True, metavar="DIR", help="where to save the merged model")
    parser.add_argument("--base", metavar="BASE", help="the base model (default: the one the adapter names)")
    parser.add_argument("--dtype", metavar="DTYPE",
                        help="float32, bfloat16, float16 or auto (default: the dtype the base is stored in)")
    options = parser.parse_args(args)
    _quiet([options.adapter_dir])
    from .console import peft_quietly
    from .models import merge_adapter

    with peft_quietly():  # PEFT's read of a deprecated transformers property, not the user's
        merge_adapter(options.adapter_dir, options.output, base=options.base, dtype=options.dtype)
    return 0


def _add_generation(parser: _Parser):
    """The generation settings; one not given is the model's generation config's."""
    parser.add_argument("--max_new_tokens", type=int, metavar="N", help="most tokens per answer")
    parser.add_argument("--temperature", type=float, metavar="T",
                        help="sampling temperature (implies --do_sample true)")
    parser.add_argument("--top_p", type=float, metavar="P", help="nucleus sampling mass (implies --do_sample true)")
    parser.add_argument("--do_sample", type=boolean, metavar="BOOL",
                        help="sample (true) or decode greedily (false); true/false, 1/0, yes/no")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="the random seed (default 0)")


def _generation(options: argparse.Namespace) -> dict:
    """The generation settings given on the command line, for `Generator` and `evaluate`: read as
    the Python API reads its keyword arguments (`api._sampling`; a temperature or top_p samples)."""
    from .api import GENERATION_KEYS, _sampling

    return _sampling({key: getattr(options, key) for key in GENERATION_KEYS})


def cmd_eval(args: list[str]) -> int:
    parser = _Parser("eval", "Preference and generation metrics of one or more models, side by side.")
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="a saved model (repeat for several; the first is the base of the win rates)")
    parser.add_argument("--data", metavar="FILE_OR_FOLDER", help="preference pairs to score")
    parser.add_argument("--split", help="the split of --data to score (default: a file's only split, a folder's test)")
    parser.add_argument("--prompts", metavar="FILE", help="prompts to answer (.txt, .json, .jsonl)")
    parser.add_argument("--reward_model", metavar="DIR", help="a local reward model that judges the answers")
    parser.add_argument("--alpaca_eval", metavar="DIR", help="write AlpacaEval-format answers here")
    parser.add_argument("--output", metavar="REPORT.json", help="also write the report as JSON")
    _add_generation(parser)
    options = parser.parse_args(args)
    _quiet(options.model)
    from .evaluation import evaluate, format_report

    report = evaluate(options.model, data=options.data, split=options.split, prompts=options.prompts,
                      reward_model=options.reward_model, alpaca_dir=options.alpaca_eval, seed=options.seed,
                      **_generation(options))
    if os.environ.get("RANK", "0") != "0":  # under a launcher every process holds the whole report
        return 0
    print(format_report(report))
    if options.output:
        Path(options.output).write_text(json.dumps(report, indent=1))
        print(f"prefopt: report in {options.output}")
    return 0


def cmd_generate(args: list[str]) -> int:
    parser = _Parser("generate", "Answer prompts with a saved model; with no prompt, an interactive chat.")
    parser.add_argument("--model", required=True, metavar="DIR", help="a saved model")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for several)")
    parser.add_argument("--prompts", metavar="FILE", help="prompts from a file (.txt, .json, .jsonl)")
    parser.add_argument("--output", metavar="FILE", help="write the answers as AlpacaEval-format JSON")
    _add_generation(parser)
    options = parser.parse_args(args)
    _quiet([options.model])
    from transformers import set_seed

    from .evaluation import Generator, alpaca_eval_rows, read_prompts

    set_seed(options.seed)
    generator = Generator(options.model, **_generation(options))
    conversations = [[{"role": "user", "content": p}] for p in options.prompt]
    if options.prompts:
        conversations += read_prompts(options.prompts)
    if not conversations:
        from .chat import chat

        return chat(generator)
    answers = generator.answer(conversations, progress=len(conversations) > 1)
    for conversation, answer in zip(conversations, answers):
        print(f"> {conversation[-1]['content']}\n{answer}\n")
    if options.output:
        rows = alpaca_eval_rows(conversations, answers, generator.name)
        Path(options.output).write_text(json.dumps(rows, indent=1))
    return 0


def cmd_plot(args: list[str]) -> int:
    parser = _Parser("plot", "PNGs of a run's metrics.jsonl, in OUTPUT_DIR/plots (training also writes them).")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output_dir")
    output_dir = parser.parse_args(args).output_dir
    from .plots import plot_run

    written = plot_run(output_dir)
    print(f"prefopt: wrote {', '.join(written)} in {output_dir}/plots")
    return 0


def cmd_push(args: list[str]) -> int:
    parser = _Parser("push", "Upload a finished run to the Hugging Face Hub: its model (or adapter), tokenizer, "
                             "model card (README.md, rendered again to name the repository), plots and records.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a finished run's output_dir")
    parser.add_argument("--repo_id", required=True, metavar="ID",
                        help="the model repository, NAME or OWNER/NAME (created if it does not exist)")
    parser.add_argument("--private", type=boolean, metavar="BOOL",
                        help="create the repository private (true) or public (false); default: the owner's default")
    parser.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if needed; default main)")
    parser.add_argument("--token", metavar="TOKEN", help="a Hub token with write access (default: HF_TOKEN, or the "
                                                         "one `hf auth login` saved)")
    options = parser.parse_args(args)
    from .hub import push

    push(options.output_dir, options.repo_id, token=options.token, private=options.private,
         revision=options.revision)
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "data": cmd_data, "pairs": cmd_pairs, "iterate": cmd_iterate, "merge": cmd_merge, "plot": cmd_plot, "eval": cmd_eval,
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
