"""The command line: a table of plain functions.

    prefopt train [CONFIG.yaml] [--key value ...]     (no config: the offline demo)
    prefopt config explain CONFIG.yaml [--key value ...]
    prefopt merge ADAPTER_DIR --output DIR [--base BASE] [--dtype bfloat16]
    python -m prefopt ...                             (the same)
"""

import json
import os
import sys
from pathlib import Path

from .errors import PrefoptError, Stopped

USAGE = """usage:
  prefopt train [CONFIG.yaml] [--key value ...]   train (no config: the built-in offline demo)
  prefopt config explain CONFIG.yaml [--key value ...]
                                                  print the resolved objective and settings
  prefopt merge ADAPTER_DIR --output DIR [--base BASE] [--dtype DTYPE]
                                                  fold a LoRA adapter into its base; save a full model
  prefopt plot OUTPUT_DIR                         PNGs of a run's metrics (OUTPUT_DIR/plots)
  prefopt eval --model DIR [--model DIR2] [--data PAIRS] [--prompts FILE] [--reward_model DIR]
                                                  preference and generation metrics, side by side
  prefopt generate --model DIR [--prompt TEXT | --prompts FILE]
                                                  answer prompts (none given: an interactive chat)
Any config key can be given or overridden as --key value."""


def _config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("--"):
        return args[0], args[1:]
    return None, args


def cmd_train(args: list[str]) -> int:
    path, overrides = _config_and_overrides(args)
    if path is None and not overrides:
        from .demo import run_demo

        run_demo()
        return 0
    from .config import load_config
    from .pipeline import train

    train(load_config(path, overrides))
    return 0


def cmd_config(args: list[str]) -> int:
    if not args or args[0] != "explain":
        raise PrefoptError("usage: prefopt config explain CONFIG.yaml [--key value ...]")
    from .config import explain, load_config

    path, overrides = _config_and_overrides(args[1:])
    if path is None and not overrides:
        raise PrefoptError("prefopt config explain: name a config file.")
    print(explain(load_config(path, overrides)))
    return 0


def _options(args: list[str], names: set[str], usage: str, repeated: set[str] = frozenset()
             ) -> tuple[list[str], dict]:
    """Positional arguments and `--name value` / `--name=value` options (`repeated` ones: lists)."""
    positional, options, i = [], {n: [] for n in repeated}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if key not in names:
                raise PrefoptError(f"unknown option --{key}. {usage}")
            if not value:
                if i + 1 >= len(args):
                    raise PrefoptError(f"--{key} needs a value. {usage}")
                i, value = i + 1, args[i + 1]
            if key in repeated:
                options[key].append(value)
            else:
                options[key] = value
        else:
            positional.append(arg)
        i += 1
    return positional, options


def cmd_merge(args: list[str]) -> int:
    usage = "usage: prefopt merge ADAPTER_DIR --output DIR [--base BASE] [--dtype float32|bfloat16|float16]"
    positional, options = _options(args, {"output", "base", "dtype"}, usage)
    if len(positional) != 1 or "output" not in options:
        raise PrefoptError(usage)
    from .models import merge_adapter

    merge_adapter(positional[0], options["output"], base=options.get("base"), dtype=options.get("dtype"))
    return 0


GENERATION_OPTIONS = {"max_new_tokens": int, "temperature": float, "top_p": float, "do_sample": lambda v: v == "true",
                      "seed": int}


def _generation(options: dict) -> dict:
    out = {}
    for key, cast in GENERATION_OPTIONS.items():
        if key in options:
            try:
                out[key] = cast(options.pop(key))
            except ValueError:
                raise PrefoptError(f"--{key}: not a valid value.") from None
    if "temperature" in out or "top_p" in out:
        out.setdefault("do_sample", True)
    return out


def _seed(generation: dict) -> int:
    return generation.pop("seed", 0)


def cmd_eval(args: list[str]) -> int:
    usage = ("usage: prefopt eval --model DIR [--model DIR2 ...] [--data FILE_OR_FOLDER [--split test]] "
             "[--prompts FILE] [--reward_model DIR] [--alpaca_eval DIR] [--output report.json] "
             "[--max_new_tokens N] [--temperature T] [--top_p P] [--seed S]")
    positional, options = _options(args, {"model", "data", "split", "prompts", "reward_model", "alpaca_eval",
                                          "output", *GENERATION_OPTIONS}, usage, repeated={"model"})
    if positional or not options["model"]:
        raise PrefoptError(usage)
    from .evaluate import evaluate, format_report

    generation = _generation(options)
    report = evaluate(options["model"], data=options.get("data"), split=options.get("split", "test"),
                      prompts=options.get("prompts"), reward_model=options.get("reward_model"),
                      alpaca_dir=options.get("alpaca_eval"), seed=_seed(generation), **generation)
    if os.environ.get("RANK", "0") != "0":  # under a launcher every process holds the whole report
        return 0
    print(format_report(report))
    if "output" in options:
        Path(options["output"]).write_text(json.dumps(report, indent=1))
        print(f"prefopt: report in {options['output']}")
    return 0


def cmd_generate(args: list[str]) -> int:
    usage = ("usage: prefopt generate --model DIR [--prompt TEXT ...] [--prompts FILE] [--output FILE] "
             "[--max_new_tokens N] [--temperature T] [--top_p P]   (no prompt: an interactive chat)")
    positional, options = _options(args, {"model", "prompt", "prompts", "output", *GENERATION_OPTIONS}, usage,
                                   repeated={"prompt"})
    if positional or "model" not in options:
        raise PrefoptError(usage)
    from .evaluate import Generator, alpaca_eval_rows, read_prompts

    generation = _generation(options)
    from transformers import set_seed

    set_seed(_seed(generation))
    generator = Generator(options["model"], **generation)
    conversations = [[{"role": "user", "content": p}] for p in options["prompt"]]
    if "prompts" in options:
        conversations += read_prompts(options["prompts"])
    if not conversations:
        return _chat(generator)
    answers = generator.answer(conversations, progress=len(conversations) > 1)
    for conversation, answer in zip(conversations, answers):
        print(f"> {conversation[-1]['content']}\n{answer}\n")
    if "output" in options:
        rows = alpaca_eval_rows(conversations, answers, generator.name)
        Path(options["output"]).write_text(json.dumps(rows, indent=1))
    return 0


def _chat(generator) -> int:
    """Read a turn, answer it, keep the conversation; an empty line or end of input stops."""
    history: list[dict] = []
    print("prefopt chat: type a message; an empty line ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        (answer,) = generator.answer([history], progress=False)
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def cmd_plot(args: list[str]) -> int:
    if len(args) != 1 or args[0].startswith("--"):
        raise PrefoptError("usage: prefopt plot OUTPUT_DIR")
    from .plots import plot_run

    written = plot_run(args[0])
    print(f"prefopt: wrote {', '.join(written)} in {args[0]}/plots")
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "merge": cmd_merge, "plot": cmd_plot, "eval": cmd_eval,
            "generate": cmd_generate}


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
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"prefopt: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")  # under a launcher, say which process it was
    try:
        return command(argv[1:])
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


if __name__ == "__main__":
    sys.exit(main())
