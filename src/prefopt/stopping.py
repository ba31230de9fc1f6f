"""SIGTERM and SIGINT: stop at the next step boundary with a complete checkpoint.

A cluster pre-empts a job with SIGTERM (SLURM's `scancel`, a pre-emption, `--signal=TERM@120`;
torchrun forwards it to every worker), a person with Ctrl-C. While training, the first signal asks
for a stop: the step in progress finishes, every process agrees on it at the step's end, the
Trainer writes a checkpoint there (complete and checksummed, as any other), and the run exits
with 128 + the signal's number and one line saying how to continue. Outside the training loop
(tokenizing, loading, the final save), or at a second signal, it stops at once: nothing is
half-resumed from later, because only complete checkpoints are.
"""

import signal
import threading

import torch
from transformers import TrainerCallback

from .errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The signal handlers' state for one run."""

    def __init__(self, log=print):
        self.signum: int | None = None
        self.training = False  # inside the training loop: stop gracefully at the step's end
        self.log = log
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a notebook's worker)
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.training and self.signum is None:
            self.signum = signum
            self.log(f"prefopt: {name}: stopping after this step, with a checkpoint")
            return
        raise Stopped(signum, f"stopped by {name} before anything was saved that a run could resume from; the last "
                              "complete checkpoint (if any) is intact. Run the same command again to continue.")


class StopOnSignal(TrainerCallback):
    """At every step's end: has any process been asked to stop? Then save and stop, everywhere at
    the same step (one tiny all-reduce per optimizer step, only with several processes)."""

    def __init__(self, request: StopRequest, accelerator):
        self.request, self.accelerator = request, accelerator

    def on_train_begin(self, args, state, control, **kwargs):
        self.request.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.request.training = False

    def on_step_end(self, args, state, control, **kwargs):
        asked = self.request.signum or 0
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([asked], device=self.accelerator.device)
            asked = int(self.accelerator.reduce(flag, reduction="sum").item())
            if asked and self.request.signum is None:
                self.request.signum = int(signal.SIGTERM)  # another process got the signal
        if asked:
            control.should_save = True
            control.should_training_stop = True
