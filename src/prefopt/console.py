"""What `prefopt train` prints while it trains: one short line per log, and progress that suits
where the output goes.

A logged line is a fixed, short set of numbers (`train_line`, `eval_line`): step, epoch, loss,
preference accuracy and margin, the NLL term where the objective has one, learning rate and
gradient norm. Everything else that was logged (rewards, log-probs, logits, lengths, …) is in
`metrics.jsonl` only (`trainer.MetricsFile`), untouched by this module.

Progress: on a terminal, tqdm's bar (the log lines written above it); when stderr is not a
terminal (a log file, a batch job), a bar would be one line of carriage returns thousands of
characters long, so plain lines are printed instead (`step 40/200 (20%) elapsed 1:02 eta 4:08`)
every 5% of the steps and at least every `PLAIN_EVERY_S` seconds. In a notebook the Trainer's
notebook display is left alone.

The libraries' own noise is stopped here too, each at its source and narrowly: DeepSpeed's
accelerator probe where DeepSpeed is not used (`quiet_deepspeed`), PEFT's read of a deprecated
transformers property (`peft_quietly`), and the loading, tokenizing and writing bars of transformers
and datasets where they would only flash by or fill a log file (`library_bars`).
"""

import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

PLAIN_EVERY_S = 120.0  # a plain progress line at least this often, however slow the steps
SMALL_WEIGHTS = 1 << 30  # local weights under 1 GiB load in about a second: no bar for them

# (logged key, shown name, format); a column is shown when the line has its value
TRAIN_COLUMNS = (("loss", "loss", "{:.4f}"), ("rewards/accuracies", "acc", "{:.3f}"),
                 ("rewards/margins", "margin", "{:.4g}"), ("nll_loss", "nll", "{:.4f}"),
                 ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "grad_norm", "{:.3g}"))
EVAL_COLUMNS = (("eval_loss", "loss", "{:.4f}"), ("eval_rewards/accuracies", "acc", "{:.3f}"),
                ("eval_rewards/margins", "margin", "{:.4g}"), ("eval_nll_loss", "nll", "{:.4f}"))


def is_terminal(stream=None) -> bool:
    """Whether `stream` (stderr, where bars are drawn) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _number(fmt: str, value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return "nan" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def _columns(logs: dict, columns, nll: bool) -> str:
    shown = []
    for key, name, fmt in columns:
        if name == "nll" and not nll:  # 0 by definition where the objective has no NLL term
            continue
        text = _number(fmt, logs.get(key))
        if text is not None:
            shown.append(f"{name} {text}")
    return "  ".join(shown)


def train_line(logs: dict, step: int, max_steps: int, nll: bool) -> str:
    epoch = logs.get("epoch")
    where = f"step {step}/{max_steps}" + (f"  epoch {epoch:.2f}" if isinstance(epoch, (int, float)) else "")
    return f"{where}  {_columns(logs, TRAIN_COLUMNS, nll)}"


def eval_line(logs: dict, step: int, max_steps: int, nll: bool) -> str:
    return f"eval step {step}/{max_steps}  {_columns(logs, EVAL_COLUMNS, nll)}"


def log_line(logs: dict, step: int, max_steps: int, nll: bool) -> str | None:
    """The console line of one logged dict; None for the end-of-training totals (the run's summary
    says them). A line logged by someone else's callback shows its numbers, formatted."""
    if "loss" in logs:
        return train_line(logs, step, max_steps, nll)
    if "eval_loss" in logs:
        return eval_line(logs, step, max_steps, nll)
    if "train_runtime" in logs:
        return None
    shown = [f"{k} {t}" for k, v in logs.items() if k != "total_flos" and (t := _number("{:.4g}", v)) is not None]
    return f"step {step}/{max_steps}  " + "  ".join(shown) if shown else None


def clock(seconds: float) -> str:
    """1:02, 1:02:03."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def progress_line(step: int, max_steps: int, elapsed: float, done: int) -> str:
    """`step 40/200 (20%) elapsed 1:02 eta 4:08`; `done`: steps taken since this process started
    (a resumed run's ETA is from its own pace)."""
    pct = 100 * step // max(max_steps, 1)
    eta = f" eta {clock(elapsed / done * (max_steps - step))}" if done > 0 else ""
    return f"step {step}/{max_steps} ({pct}%) elapsed {clock(elapsed)}{eta}"


class ConsoleProgress(ProgressCallback):
    """On a terminal: the Trainer's bar, with prefopt's short log lines written above it."""

    def __init__(self, nll: bool):
        super().__init__()
        self.nll = nll

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = log_line(logs, state.global_step, state.max_steps, self.nll)
            if line:
                self.training_bar.write(line)


class PlainProgress(TrainerCallback):
    """Off a terminal: no bars; a progress line every 5% of the steps (and at least every
    `every_s` seconds), and the short log lines, on stdout."""

    def __init__(self, nll: bool, every_s: float = PLAIN_EVERY_S, now=time.monotonic, out=None):
        self.nll, self.every_s, self.now, self.out = nll, every_s, now, out
        self.start = self.last = 0.0
        self.first_step, self.training = 0, False

    def _print(self, line: str):
        print(line, file=self.out or sys.stdout, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = self.now()
        self.first_step, self.training = state.global_step, True

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step, total, now = state.global_step, state.max_steps, self.now()
        stride = max(1, math.ceil(total / 20))
        if step % stride == 0 or step == total or now - self.last >= self.every_s:
            self.last = now
            self._print(progress_line(step, total, now - self.start, step - self.first_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training and logs:
            line = log_line(logs, state.global_step, state.max_steps, self.nll)
            if line:
                self._print(line)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False


def install(trainer, nll: bool, terminal: bool | None = None):
    """The Trainer's progress display and log printing replaced by prefopt's (not in a notebook,
    whose display the Trainer chose itself). `disable_tqdm: true` asks for no bar: plain lines."""
    kinds = {type(cb) for cb in trainer.callback_handler.callbacks}
    if not kinds & {ProgressCallback, PrinterCallback}:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    terminal = is_terminal() if terminal is None else terminal
    bar = terminal and not trainer.args.disable_tqdm
    trainer.add_callback(ConsoleProgress(nll) if bar else PlainProgress(nll))


# -- the libraries ---------------------------------------------------------------------------------

def quiet_deepspeed(uses_deepspeed: bool, device_type: str):
    """accelerate imports DeepSpeed, when installed, to recognise its engine even in runs that do not
    use it; on import DeepSpeed probes the machine and warns on every process that it found no GPU
    ("Setting accelerator to CPU"). Where the run trains on the CPU without DeepSpeed, tell it the
    accelerator instead (`DS_ACCELERATOR`, its own setting), so it has nothing to warn about. A run
    that uses DeepSpeed, or a user's own DS_ACCELERATOR, is left as it is."""
    if not uses_deepspeed and device_type == "cpu" and "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def peft_quietly():
    """PEFT's PeftModel reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a
    model, and transformers warns (FutureWarning) about a call the user never made: that one
    warning, by its message and module, is not shown while a model is wrapped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning, module=r"transformers\.modeling_utils")
        yield


def weights_bytes(path: str) -> int | None:
    """The size of a local model folder's weight files; None where it cannot be told here (a Hub id,
    an adapter whose base loads from elsewhere, a folder with no weights of its own)."""
    folder = Path(path)
    if not folder.is_dir() or (folder / "adapter_config.json").is_file():
        return None
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    return size or None


@contextmanager
def library_bars(terminal: bool, weights: int | None = None):
    """transformers' and datasets' own bars (loading weights, generating splits, tokenizing, writing
    shards): off when not on a terminal, where each is a line of carriage returns; on a terminal,
    transformers' (loading and writing the weights) are off for small local weights (`weights`
    bytes), which load and save before a bar could show anything. Put back as they were afterwards
    (`prefopt.train` from Python)."""
    import datasets
    from transformers.utils import logging as hf_logging

    off = not terminal or (weights is not None and weights < SMALL_WEIGHTS)
    hf_was, ds_was = hf_logging.is_progress_bar_enabled(), not datasets.are_progress_bars_disabled()
    try:
        if off:
            hf_logging.disable_progress_bar()
        if not terminal:
            datasets.disable_progress_bars()
        yield
    finally:
        if off and hf_was:
            hf_logging.enable_progress_bar()
        if not terminal and ds_was:
            datasets.enable_progress_bars()


def quiet_command(models: list[str] = ()):
    """For the commands that load a model but train nothing (`eval`, `generate`, `merge`, `data`):
    DeepSpeed's probe told the accelerator, the libraries' bars off where stdout is not a terminal
    (each is a line of carriage returns in a log), and transformers' loading bars off for small
    local weights. For the rest of the process: a command is the whole of it."""
    import datasets
    from transformers.utils import logging as hf_logging

    quiet_deepspeed(False, device_type())
    sizes = [weights_bytes(m) for m in models]
    if not is_terminal() or (sizes and all(s is not None and s < SMALL_WEIGHTS for s in sizes)):
        hf_logging.disable_progress_bar()
    if not is_terminal():
        datasets.disable_progress_bars()


def device_type() -> str:
    """"cpu" where torch sees no accelerator (CUDA, Apple's MPS, Intel's XPU), else the first found:
    DeepSpeed is told the CPU only on a machine that has nothing else."""
    import torch

    for name, backend in (("cuda", torch.cuda), ("mps", getattr(torch.backends, "mps", None)),
                          ("xpu", getattr(torch, "xpu", None))):
        if backend is not None and backend.is_available():
            return name
    return "cpu"
