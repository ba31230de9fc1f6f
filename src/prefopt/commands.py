"""The commands that work on saved models and finished runs: merge, eval, generate, plot, push
(argparse, fixed options). `cli` dispatches to them."""

import argparse
import json
import os
from pathlib import Path

from .cliparse import _Parser, boolean

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
