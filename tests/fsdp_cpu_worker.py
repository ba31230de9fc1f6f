"""Run prefopt's trainer under FSDP2 on CPU processes (gloo), for tests only.

    torchrun --nproc_per_node 2 tests/fsdp_cpu_worker.py train CONFIG.yaml --output_dir DIR [--key value ...]

accelerate turns FSDP on only for GPU setups, and prefopt refuses FSDP without CUDA rather than
let it fall back to DDP silently. This worker forces accelerate's state to FSDP after the Trainer
built its accelerator, so the trainer's FSDP paths (the head called as a module, the final model
gathered from sharded state, the saved-model check) run here too. It repeats the steps of
`pipeline.train` minus the refusals.
"""

import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from prefopt import data as data_mod
from prefopt import pipeline
from prefopt.config import load_config
from prefopt.models import check_saved, load_model, load_tokenizer
from prefopt.trainer import PreferenceTrainer


class FSDPOnCPU(PreferenceTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def main(argv: list[str]):
    torch.set_num_threads(1)  # as the one-process run it is compared with (tests/conftest.py)
    assert argv[0] == "train", "usage: fsdp_cpu_worker.py train CONFIG.yaml [--key value ...]"
    cfg = load_config(argv[1], argv[2:])
    t = cfg.training
    tokenizer = load_tokenizer(cfg.model)
    with t.main_process_first():
        prepared = data_mod.prepare(cfg, tokenizer)
    model = load_model(cfg.model, tokenizer, t, log=lambda *a: None)
    pipeline.PreferenceTrainer = FSDPOnCPU
    trainer = pipeline.build_trainer(cfg, model, tokenizer, prepared, log=lambda *a: None)
    assert trainer.accelerator.distributed_type == DistributedType.FSDP
    trainer.train()
    # FSDP shards the head: scored as a module (untied) or through the model's own head (tied), never fused
    assert type(trainer.scorer(trainer.model_wrapped)).__name__ in ("ModuleHead", "OwnHead")
    assert type(trainer.model_wrapped).__name__.startswith("FSDP"), type(trainer.model_wrapped)
    trainer.save_model(t.output_dir)
    if trainer.is_world_process_zero():
        n = check_saved(t.output_dir)
        print(f"fsdp worker: {trainer.accelerator.num_processes} processes, {type(trainer.model_wrapped).__name__}, "
              f"{str(trainer.accelerator.state.fsdp_plugin.state_dict_type).rsplit('.', 1)[-1]}, saved {n} parameters")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
