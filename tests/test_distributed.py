"""Many processes on the CPU: `torchrun --nproc_per_node 2 -m prefopt train` (gloo) against one
process with the same global batch. The loss trajectory, every logged metric and the final weights
must agree: the step is normalised over all pairs and tokens of the optimizer step on all ranks,
and metrics are sums and counts reduced over ranks, not rank 0's view."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import AFTER_ADAM_REL, ROUND_OFF_REL, assert_adam_weights_close, assert_logged_close, free_port
from prefopt.tiny import save_tiny, tiny_model

# The run compared across process counts (tests/test_multinode.py runs it across nodes)
SPLITS = {"train": (32, 0), "test": (12, 1)}
RUN = dict(
    method="cpo_simpo",  # a preference term and an NLL term normalised by token count
    learning_rate=5e-3,
    max_steps=4,
    gradient_accumulation_steps=2,
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=2,
    per_device_eval_batch_size=3,
    report_to="none",
    seed=5,
)


@pytest.fixture(scope="module")
def ws(workspace):
    built = workspace("dist", SPLITS, **RUN, save_strategy="no")
    tok = built.tokenizer
    save_tiny(tiny_model("llama", tok, seed=0, tie_word_embeddings=True), tok, built.root / "tied")
    return built.root


ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "grad_norm", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen")
EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen")


def _run(ws, out, launcher: list[str], per_device: int, *extra: str):
    # one thread per process in every run, the one-process reference too (tests/conftest.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = launcher + ["train", str(ws / "config.yaml"), "--output_dir", str(out),
                      "--per_device_train_batch_size", str(per_device), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ws)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    weights = out / ("adapter_model.safetensors" if (out / "adapter_config.json").exists() else "model.safetensors")
    return done, lines, load_file(weights)


def torchrun(n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(free_port()), "-m", "prefopt"]


@pytest.fixture(scope="module")
def single(ws, tmp_path_factory):
    """The reference: one process, 4 pairs per micro-batch, 2 micro-batches per step."""
    return _run(ws, tmp_path_factory.mktemp("one") / "out", [sys.executable, "-m", "prefopt"], 4)


def assert_same_run(reference, other, start: dict | None):
    """The same logged trajectory and final weights: step 1 (before any optimizer step) to
    round-off, later steps and the weights to what 4 Adam steps make of round-off (helpers)."""
    _, one, w1 = reference
    _, two, w2 = other
    train1 = [x for x in one if "loss" in x and "train_runtime" not in x]
    train2 = [x for x in two if "loss" in x and "train_runtime" not in x]
    assert [x["step"] for x in train2] == [x["step"] for x in train1] == [1, 2, 3, 4]
    for a, b in zip(train1, train2):
        assert_logged_close(a, b, KEYS, ROUND_OFF_REL if a["step"] == 1 else AFTER_ADAM_REL)
    evals1 = [x for x in one if "eval_loss" in x]
    evals2 = [x for x in two if "eval_loss" in x]
    assert len(evals2) == len(evals1) == 2
    for a, b in zip(evals1, evals2):
        # 12 held-out pairs over 2 ranks × batch 3: each rank sees 6; the logged value is over all 12
        assert_logged_close(a, b, EVAL_KEYS, AFTER_ADAM_REL)
    assert_adam_weights_close(w1, w2, lr=5e-3, steps=4, start=start)


def _start(ws, model: str = "model") -> dict:
    return load_file(ws / model / "model.safetensors")


def test_two_processes_equal_one_with_the_same_global_batch(ws, single, tmp_path):
    run = _run(ws, tmp_path / "two", torchrun(), 2)
    assert run[0].stdout.count("prefopt: resolved objective") == 1  # only rank 0 speaks
    assert "prefopt: 2 processes on cpu, DDP" in run[0].stdout
    assert_same_run(single, run, _start(ws))


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                               "stage3_param_persistence_threshold": 0},  # shard even tiny tensors
         "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


@pytest.mark.parametrize("launch", ["torchrun", "deepspeed"])
def test_zero3_from_a_deepspeed_json_equals_one_process(ws, single, tmp_path, launch):
    """The SimPO repo's route: `deepspeed: ds_config.json` in the YAML, any launcher. The final
    model is gathered from the shards and checked before the run reports success."""
    (ws / "ds_zero3.json").write_text(json.dumps(ZERO3))
    # the deepspeed launcher gets the seeds' own JSON (its bf16 "auto" resolves to off here)
    (ws / "ds_seed.json").write_text((ROOT / "tests/fixtures/seed_configs/ds_config.json").read_text())
    launcher = torchrun() if launch == "torchrun" else [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        "--module", "prefopt"]
    run = _run(ws, tmp_path / "z3", launcher, 2, "--deepspeed", "ds_zero3.json" if launch == "torchrun" else "ds_seed.json")
    assert "prefopt: 2 processes on cpu, DeepSpeed ZeRO-3" in run[0].stdout
    assert "saved model checked: 110,656 parameters" in run[0].stdout
    assert_same_run(single, run, _start(ws))


@pytest.mark.parametrize("config, stage", [("configs/accelerate/zero3.yaml", 3), ("configs/accelerate/zero2.yaml", 2),
                                           ("tests/fixtures/seed_configs/deepspeed_zero3.yaml", 3)])
def test_accelerate_deepspeed_configs_run(ws, single, tmp_path, config, stage):
    """The shipped configs and the seeds' own, launched as the seeds do (the precision is the
    command line's: bf16 needs a GPU)."""
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                str(ROOT / config), "--num_processes", "2",
                "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "prefopt"]
    run = _run(ws, tmp_path / "out", launcher, 2)
    assert f"prefopt: 2 processes on cpu, DeepSpeed ZeRO-{stage}" in run[0].stdout
    assert_same_run(single, run, _start(ws))


@pytest.mark.parametrize("diversity", [False, True])
def test_lora_with_checkpointing_under_zero3_equals_one_process(ws, tmp_path, diversity):
    """A frozen head partitioned by ZeRO-3 is gathered by the fused head kernels themselves (called
    as a module inside a checkpoint, ZeRO-3 did not gather it again for the recompute), the diversity
    term's kernel included."""
    (ws / "ds_zero3.json").write_text(json.dumps(ZERO3))
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--gradient_checkpointing", "true"]
    if diversity:
        lora += ["--diversity_weight", "0.5", "--diversity_alpha", "0.5"]
    one = _run(ws, tmp_path / "one", [sys.executable, "-m", "prefopt"], 4, *lora)
    run = _run(ws, tmp_path / "z3", torchrun(), 2, "--deepspeed", "ds_zero3.json", *lora)
    assert "prefopt: 2 processes on cpu, DeepSpeed ZeRO-3" in run[0].stdout
    # an adapter has no start on disk: its lora_B starts at zero, and the run moved every one
    lora_b = [w for name, w in one[2].items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 1e-3 for w in lora_b)
    assert_same_run(one, run, None)


FSDP2 = ["--fsdp", "full_shard auto_wrap", "--fsdp_config",
         json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                     "state_dict_type": "SHARDED_STATE_DICT"})]


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp2_forced_on_cpu_processes_equals_one_process(ws, single, tmp_path, tied):
    """FSDP runs only on GPUs in a real launch; tests/fsdp_cpu_worker.py forces accelerate's state to
    FSDP2 on two CPU processes so the trainer's FSDP paths run here: an untied head as its own FSDP
    unit, a tied one scored through the model's own head call, and a final model gathered from
    sharded state (the Trainer alone would write no weights with SHARDED_STATE_DICT)."""
    worker = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), str(ROOT / "tests" / "fsdp_cpu_worker.py")]
    extra = ["--model_name_or_path", str(ws / "tied")] if tied else []
    reference = _run(ws, tmp_path / "one", [sys.executable, "-m", "prefopt"], 4, *extra) if tied else single
    run = _run(ws, tmp_path / "fsdp", worker, 2, *FSDP2, *extra)
    assert "fsdp worker: 2 processes, FSDPLlamaForCausalLM, SHARDED_STATE_DICT" in run[0].stdout
    assert_same_run(reference, run, _start(ws, "tied" if tied else "model"))


def test_shipped_accelerate_configs_validate():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = {p.stem: ClusterConfig.from_yaml_file(p) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert sorted(configs) == ["ddp", "fsdp", "zero2", "zero3"]
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"
    assert configs["zero2"].deepspeed_config["zero_stage"] == 2
    z3 = configs["zero3"].deepspeed_config
    assert z3["zero_stage"] == 3 and z3["zero3_save_16bit_model"] is True and z3["zero3_init_flag"] is True
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    for c in configs.values():
        assert c.num_machines == 1 and not c.use_cpu


def test_fsdp_is_refused_on_cpu_before_loading(ws, tmp_path, monkeypatch, capsys):
    from prefopt.cli import main

    assert main(["train", str(ws / "config.yaml"), "--output_dir", str(tmp_path / "f"),
                 "--fsdp", "full_shard auto_wrap", "--model_name_or_path", str(tmp_path / "nowhere")]) == 2
    assert "FSDP runs on CUDA GPUs only" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    assert main(["train", str(ws / "config.yaml"), "--output_dir", str(tmp_path / "f")]) == 2
    assert "use DDP (torchrun --nproc_per_node N" in capsys.readouterr().err


def test_deepspeed_config_mistakes_are_refused_before_loading(ws, tmp_path, capsys):
    from prefopt.cli import main

    def err(*args):
        assert main(["train", str(ws / "config.yaml"), "--output_dir", str(tmp_path / "d"), *args]) == 2
        return capsys.readouterr().err

    assert "deepspeed: no such file 'missing.json'" in err("--deepspeed", "missing.json")
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,}\n}')
    assert "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 35" in err(
        "--deepspeed", str(tmp_path / "bad.json"))
    ungathered = {**ZERO3, "zero_optimization": {"stage": 3}}
    (tmp_path / "z3.json").write_text(json.dumps(ungathered))
    assert "stage3_gather_16bit_weights_on_model_save: true" in err("--deepspeed", str(tmp_path / "z3.json"))


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    from prefopt.cli import _drop_local_rank

    assert _drop_local_rank(["--local_rank=1", "train", "c.yaml", "--local_rank", "0", "--seed", "3"]) == [
        "train", "c.yaml", "--seed", "3"]
