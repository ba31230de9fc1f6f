"""The generations table (`generate_during_eval`, TRL's CPOConfig/ORPOConfig key): at each
evaluation, the policy's answers to a fixed set of held-out prompts.

    output_dir/eval_generations.jsonl   one line per prompt and evaluation:
        {"step", "prompt", "chosen", "completion", "completion_tokens", "ended"}

The prompts are the first `eval_generation_prompts` distinct prompts of the evaluation split as
the model sees them (their token ids, the chat template applied), the same ones at every
evaluation, so the table shows how the answers change; `chosen` is that pair's reference answer.
Decoding is greedy (reproducible, and it draws nothing from the random streams training uses, so
the run's numbers are those of a run without the table) and stops at every EOS id of the generation
config and the tokenizer, as `prefopt generate` does. At most `eval_generation_max_new_tokens`
tokens; unset: `max_completion_length`, else up to `max_length` in all (TRL generates up to
max_length), else 256. `completion_tokens` counts the generated tokens (the EOS included),
`ended` says whether an EOS ended the answer (false: cut at the budget).

The same table goes to the trackers the run reports to: a `wandb.Table` under
`eval/generations` for W&B, a Markdown table (`add_text`) for TensorBoard; other trackers get
none. Only the first process generates and writes (the others go on to the next collective step
and wait there), except when the weights are sharded over processes (ZeRO-3, FSDP): then every
process takes part in every forward (`synced_gpus`) and only the first writes.

A resumed run keeps the lines up to the step it resumed from and writes the later ones again,
as metrics.jsonl; a fresh run starts the file empty.
"""

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from .checkpoints import write_atomic
from .errors import PrefoptError
from .evaluation import GENERATION_DEFAULTS

GENERATIONS_FILE = "eval_generations.jsonl"
COLUMNS = ("step", "prompt", "chosen", "completion")


def check(cfg, where: str):
    """Refuse, before anything loads, `generate_during_eval` without evaluation data to draw the
    prompts from. (The counts' ranges are `values.VALUE_RULES`'.)"""
    if cfg.run.generate_during_eval and not cfg.data.eval_datasets and not cfg.data.test_split_size:
        raise PrefoptError(
            f"{where}: generate_during_eval: true generates answers to held-out prompts at each evaluation, but no "
            "evaluation data is configured: name a held-out split (a split named like test/valid/eval in "
            "dataset_splits or datasets, or dataset_test_split), or hold part of train out with test_split_size "
            "(e.g. 0.05); or set generate_during_eval: false.")


def first_prompts(dataset, n: int) -> list[tuple[list[int], list[int]]]:
    """The first `n` distinct prompts of `dataset` (in its order) with their chosen answers' ids."""
    seen, out = set(), []
    for row in dataset.select_columns(["prompt_ids", "chosen_ids"]):
        key = tuple(row["prompt_ids"])
        if key not in seen:
            seen.add(key)
            out.append((list(row["prompt_ids"]), list(row["chosen_ids"])))
            if len(out) == n:
                break
    return out


def stop_ids(model, tokenizer) -> list[int]:
    """Every EOS id of the model's generation config, and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({i for i in eos + [tokenizer.eos_token_id] if i is not None})


def generate(model, prompts: list[list[int]], budgets: list[int], stops: list[int], pad: int,
             synced: bool = False) -> list[list[int]]:
    """Greedy answers to one batch of prompt ids (left-padded), each cut after its first stop id.
    `budgets`: each prompt's most new tokens (the batch generates up to the largest)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # max_length=None: the budget is max_new_tokens alone (a generation config's max_length would be
    # overridden anyway, with a warning at every evaluation)
    out = model.generate(input_ids=ids, attention_mask=mask, max_length=None, eos_token_id=stops, pad_token_id=pad,
                         use_cache=True, synced_gpus=synced, **{**GENERATION_DEFAULTS, "max_new_tokens": max(budgets)})
    answers = []
    for row, budget in zip(out[:, width:].tolist(), budgets):
        row = row[:budget]
        end = next((i for i, t in enumerate(row) if t in stops), None)
        answers.append(row if end is None else row[: end + 1])
    return answers


def trim(path: Path, step: int):
    """Keep the lines of steps up to `step` (a resume's; 0 for a fresh run: the file starts empty)."""
    if not path.exists():
        return
    if not path.is_file():
        raise PrefoptError(f"{path} is not a file: move it away (prefopt writes its generations there).")
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    if path.read_text() != "".join(kept):
        write_atomic(path, "".join(kept))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS[1:]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    return "\n".join(lines + ["| " + " | ".join(_cell(r[c]) for c in COLUMNS[1:]) + " |" for r in rows])


def log_to_trackers(callbacks, step: int, rows: list[dict]):
    """The table to each tracker that takes one and is running: W&B (a Table), TensorBoard (text)."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    for cb in callbacks:
        if isinstance(cb, WandbCallback) and getattr(cb, "_initialized", False):
            wandb = cb._wandb
            if getattr(wandb, "run", None) is not None:
                table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
                wandb.log({"eval/generations": table, "train/global_step": step})
        elif isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.add_text("eval/generations", markdown_table(rows), step)
            cb.tb_writer.flush()


class EvalGenerations(TrainerCallback):
    """At each evaluation, the generations table (module docstring); `trainer` is the run's."""

    def __init__(self, trainer, dataset, tokenizer, run, data):
        self.trainer, self.tokenizer = trainer, tokenizer
        self.prompts = first_prompts(dataset, run.eval_generation_prompts)
        self.max_new_tokens, self.data = run.eval_generation_max_new_tokens, data
        self.path = Path(trainer.args.output_dir) / GENERATIONS_FILE
        self.stops = stop_ids(trainer.model, tokenizer)

    def budget(self, prompt: list[int]) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.data.max_completion_length is not None:
            return self.data.max_completion_length
        if self.data.max_length is not None:
            return max(1, self.data.max_length - len(prompt))
        return 256

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            trim(self.path, state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        tr = self.trainer
        sharded = tr.is_fsdp_enabled or _zero3(tr)
        if not (state.is_world_process_zero or sharded):
            return
        answers = self.answers(sharded and tr.accelerator.num_processes > 1)
        if not state.is_world_process_zero:
            return
        decode = lambda ids, special=True: self.tokenizer.decode(ids, skip_special_tokens=special)  # noqa: E731
        rows = [{"step": state.global_step, "prompt": decode(p, False), "chosen": decode(c).strip(),
                 "completion": decode(a).strip(), "completion_tokens": len(a),
                 "ended": bool(a) and a[-1] in self.stops}
                for (p, c), a in zip(self.prompts, answers)]
        with self.path.open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        log_to_trackers(tr.callback_handler.callbacks, state.global_step, rows)

    def answers(self, synced: bool) -> list[list[int]]:
        """Every prompt's answer from the model as it is now, in eval mode and without gradients;
        the model's mode is put back after."""
        tr = self.trainer
        model = tr.accelerator.unwrap_model(tr.model_wrapped)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        was_training, size = model.training, tr.args.per_device_eval_batch_size
        model.eval()
        try:
            out = []
            with torch.no_grad(), tr.autocast_smart_context_manager():
                for start in range(0, len(self.prompts), size):
                    batch = [p for p, _ in self.prompts[start : start + size]]
                    out += generate(model, batch, [self.budget(p) for p in batch], self.stops, pad, synced)
            return out
        finally:
            model.train(was_training)


def _zero3(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3
