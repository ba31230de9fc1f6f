"""SIGTERM and SIGINT: stop at the next step boundary with a complete checkpoint.

A cluster pre-empts a job with SIGTERM (SLURM's `scancel`, a pre-emption, `--signal=TERM@120`;
torchrun forwards it to every worker), a person with Ctrl-C. While training, the first signal asks
for a stop: the step in progress finishes, every process agrees on it at the step's end, the
Trainer writes a checkpoint there (complete and checksummed, as any other), and the run exits
with 128 + the signal's number and one line saying how to continue. Outside the training loop
(tokenizing, loading, the final save), or at a second signal, it stops at once: nothing is
half-resumed from later, because only complete checkpoints are.
"""

import os
import signal
import threading
import time

import torch
from transformers import TrainerCallback

from .errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Launchers send a second signal on the heels of the first (the DeepSpeed launcher turns a Ctrl-C
# into a SIGTERM to the process tree; SLURM signals torchrun and its workers both): within this
# many seconds it is the same request, later it means "stop now".
SAME_REQUEST_S = 10


class StopRequest:
    """The signal handlers' state for one run."""

    def __init__(self, speak: bool = True):
        self.signum: int | None = None
        self.training = False  # inside the training loop: stop gracefully at the step's end
        self.speak = speak  # the first process says what happens
        self._previous = {}
        self._pid = os.getpid()
        self._first = 0.0

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
        if os.getpid() != self._pid:  # a forked worker (tokenization, data loading): die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self.training and (self.signum is None or time.monotonic() - self._first < SAME_REQUEST_S):
            if self.signum is None:
                self.signum, self._first = signum, time.monotonic()
                # os.write, not print: the signal may land while the process is writing to stderr
                if self.speak:
                    os.write(2, f"prefopt: {name}: stopping after this step, with a checkpoint\n".encode())
            return
        raise Stopped(signum, f"stopped by {name} before anything was saved that a run could resume from; the last "
                              "complete checkpoint (if any) is intact. Run the same command again to continue.")


class StopOnSignal(TrainerCallback):
    """At every step's end: has any process been asked to stop? Then save and stop, everywhere at
    the same step (one tiny all-reduce per optimizer step, only with several processes)."""

    def __init__(self, request: StopRequest, trainer):
        self.request, self.trainer, self.accelerator = request, trainer, trainer.accelerator

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
        # at the last step the run ends anyway, with its final save: nothing to stop
        if asked and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.trainer.stop_at_step = state.global_step
