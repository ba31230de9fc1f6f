"""`prefopt train ...` with a fault made to happen at a chosen moment, for tests/test_faults*.py.

    PREFOPT_FAULT=slow:0.2 python tests/fault_worker.py train CONFIG.yaml ...  # each micro-batch takes 0.2 s longer
    PREFOPT_FAULT=hold:7:FILE ...              # from step 8 on (after step 7), waits until FILE exists
    PREFOPT_FAULT=signal:TERM:final_save ...   # SIGTERM to itself once the final weights are written
    PREFOPT_FAULT=signal:INT:tokenizing ...    # SIGINT to itself as tokenization starts
    PREFOPT_FAULT=signal:TERM:step:8 ...       # SIGTERM to itself inside step 8's forward

The signals are real (os.kill on its own pid), delivered to prefopt's handlers as a scheduler's
or a person's would be.
"""

import os
import signal
import sys
import time

import prefopt.data as data_mod
import prefopt.trainer as trainer_mod
from prefopt.cli import main

kind, _, rest = os.environ["PREFOPT_FAULT"].partition(":")

if kind == "slow":
    compute_loss = trainer_mod.PreferenceTrainer.compute_loss

    def slow_compute_loss(self, *args, **kwargs):
        time.sleep(float(rest))
        return compute_loss(self, *args, **kwargs)

    trainer_mod.PreferenceTrainer.compute_loss = slow_compute_loss
elif kind == "hold":
    after, _, until = rest.partition(":")
    compute_loss = trainer_mod.PreferenceTrainer.compute_loss

    def holding_compute_loss(self, *args, **kwargs):
        while self.state.global_step >= int(after) and not os.path.exists(until):
            time.sleep(0.05)
        return compute_loss(self, *args, **kwargs)

    trainer_mod.PreferenceTrainer.compute_loss = holding_compute_loss
elif kind == "signal":
    name, _, moment = rest.partition(":")
    signum = getattr(signal, f"SIG{name}")
    if moment == "final_save":
        save_model = trainer_mod.PreferenceTrainer.save_model

        def signalling_save_model(self, output_dir=None, _internal_call=False):
            save_model(self, output_dir, _internal_call)
            if not _internal_call:  # the final save, not a checkpoint's
                os.kill(os.getpid(), signum)

        trainer_mod.PreferenceTrainer.save_model = signalling_save_model
    elif moment == "tokenizing":
        prepare = data_mod.prepare

        def signalling_prepare(*args, **kwargs):
            os.kill(os.getpid(), signum)
            return prepare(*args, **kwargs)

        data_mod.prepare = signalling_prepare
    elif moment.startswith("step:"):
        at = int(moment.split(":")[1])
        compute_loss = trainer_mod.PreferenceTrainer.compute_loss

        def signalling_compute_loss(self, *args, **kwargs):
            if self.state.global_step == at - 1:
                os.kill(os.getpid(), signum)
            return compute_loss(self, *args, **kwargs)

        trainer_mod.PreferenceTrainer.compute_loss = signalling_compute_loss
    else:
        raise SystemExit(f"PREFOPT_FAULT: unknown moment {moment!r}")
else:
    raise SystemExit(f"PREFOPT_FAULT: unknown fault {kind!r}")

sys.exit(main(sys.argv[1:]))
