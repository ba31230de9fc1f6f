"""Shared test fixtures: tiny random models and token-id pairs, built offline."""

import random
import socket

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config, TrainingArguments

from prefopt.collate import collator_for
from prefopt.config import build_config
from prefopt.trainer import PreferenceTrainer

V = 101  # vocabulary of the random-id models; 0 = pad, 1 = bos, 2 = eos


def tiny_random_model(arch: str = "llama", seed: int = 0):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                         output_router_logits=True, router_aux_loss_coef=0.02),
    }[arch]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def random_pairs(n: int, seed: int = 0, max_prompt: int = 7, max_completion: int = 9) -> list[dict]:
    """Pairs of random ids with BOS/EOS and uneven lengths (so padding and token counts matter)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, V) for _ in range(k)]  # noqa: E731
    return [
        dict(prompt_ids=[1] + ids(rng.randint(1, max_prompt)),
             chosen_ids=ids(rng.randint(1, max_completion)) + [2],
             rejected_ids=ids(rng.randint(1, max_completion)) + [2],
             source="random", row=i)
        for i in range(n)
    ]


def make_trainer(model, config_keys: dict, tmp_path, pairs=None, eval_pairs=None, callbacks=None,
                 layout: str = "padded", **training) -> PreferenceTrainer:
    cfg = build_config({"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True,
                        "logging_steps": 1, "save_strategy": "no", **config_keys, **training})
    return PreferenceTrainer(
        model=model,
        args=cfg.training,
        train_dataset=Dataset.from_list(pairs) if pairs else None,
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        callbacks=callbacks,
        data_collator=collator_for(cfg, pad_token_id=0, layout=layout,
                                   attn_implementation=model.config._attn_implementation),
        objective=cfg.objective,
    )


def free_port() -> int:
    """A TCP port nobody listens on, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
