"""`prefopt train ...` that kills itself with SIGKILL at a chosen moment, for the resume tests.

    PREFOPT_KILL=step:5 python tests/kill_worker.py train CONFIG.yaml ...   # inside step 6's forward
    PREFOPT_KILL=save:4 ...    # writing checkpoint-4: weights written, optimizer and state not yet
    PREFOPT_KILL=mark:4 ...    # checkpoint-4 fully written by the Trainer, before it is marked complete

SIGKILL cannot be caught: nothing is flushed or cleaned up, as when a job is pre-empted or
runs out of memory.
"""

import os
import signal
import sys

import torch
from transformers import Trainer

import prefopt.trainer as trainer_mod
from prefopt.cli import main

torch.set_num_threads(1)  # as the uninterrupted run it is compared with bit for bit (tests/conftest.py)
event, _, at = os.environ["PREFOPT_KILL"].partition(":")
at = int(at)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if event == "step":
    compute_loss = trainer_mod.PreferenceTrainer.compute_loss

    def killing_compute_loss(self, *args, **kwargs):
        if self.state.global_step == at:
            die()
        return compute_loss(self, *args, **kwargs)

    trainer_mod.PreferenceTrainer.compute_loss = killing_compute_loss
elif event == "save":
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def killing_save_optimizer(self, output_dir):
        if self.state.global_step == at:
            die()
        return save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = killing_save_optimizer
elif event == "mark":
    mark_complete = trainer_mod.mark_complete

    def killing_mark_complete(checkpoint):
        if checkpoint.name == f"checkpoint-{at}":
            die()
        return mark_complete(checkpoint)

    trainer_mod.mark_complete = killing_mark_complete
else:
    raise SystemExit(f"PREFOPT_KILL: unknown event {event!r}")

sys.exit(main(sys.argv[1:]))
