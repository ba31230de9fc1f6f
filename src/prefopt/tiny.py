"""Tiny offline models and tokenizers, for tests, the demo and benchmarks.

Nothing is fetched from the Hub: tokenizers are trained locally, models are built from a config.

    tok = train_tokenizer(default_corpus())
    model = tiny_model("llama", tok, seed=0)
    save_tiny(model, tok, "out/tiny-llama")  # loadable with AutoModelForCausalLM / AutoTokenizer
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
BOS = "<s>"
PAD = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PAD_MODES = ("own", "eos", None)
CHAT_TEMPLATES = ("chatml", None)


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    bos: bool = True,
    pad: str | None = "own",
    chat_template: str | None = "chatml",
    add_bos_in_template: bool = False,
    extra_special_tokens: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    `vocab_size` is an upper bound: a corpus with few distinct words runs out of merges earlier.

    Special tokens get the lowest ids, in this order: `<|endoftext|>` (eos), `<s>` (bos, if `bos`),
    `<pad>` (if `pad == "own"`), `<|im_start|>` and `<|im_end|>` (if `chat_template == "chatml"`),
    then `extra_special_tokens`. The tokenizer never inserts BOS/EOS itself (`add_special_tokens`
    adds nothing): the data pipeline decides where they go.
    """
    if pad not in PAD_MODES:
        raise ValueError(f"pad={pad!r} is not supported; use one of {PAD_MODES}.")
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(
            f"chat_template={chat_template!r} is not supported; use one of {CHAT_TEMPLATES} "
            "(set `tokenizer.chat_template` afterwards for anything else)."
        )
    if add_bos_in_template and not (bos and chat_template):
        raise ValueError("add_bos_in_template=True needs bos=True and chat_template='chatml'.")

    extra = ([IM_START, IM_END] if chat_template else []) + list(extra_special_tokens)
    specials = [EOS] + [BOS] * bos + [PAD] * (pad == "own") + extra

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Adds no tokens: where BOS/EOS go is the data pipeline's decision, so `add_special_tokens`
    # must be a no-op (a tokenizer that adds BOS itself would get it twice).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk> needed
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=BOS if bos else None,
        pad_token={"own": PAD, "eos": EOS, None: None}[pad],
        extra_special_tokens=extra,
    )
    if chat_template:
        tokenizer.chat_template = ("{{ bos_token }}" if add_bos_in_template else "") + CHATML_TEMPLATE
    return tokenizer


_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "a small bird", "the old man",
             "her sister", "the robot", "every child", "the farmer", "a young girl"]
_VERBS = ["sees", "likes", "finds", "builds", "reads", "paints", "follows", "helps", "carries",
          "opens", "remembers", "answers"]
_OBJECTS = ["a red ball", "the green door", "an old book", "the quiet river", "a long letter",
            "the bright moon", "two apples", "a wooden box", "the last train", "seven stones",
            "a blue kite", "the morning news"]
_TAILS = ["today", "in the garden", "after lunch", "at night", "near the station", "with care",
          "again", "before the rain", "every morning", "without a word"]


def default_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """`n` short English-like sentences (plus a few numbers and punctuation), the same for a given seed."""
    rng = random.Random(seed)
    sentences = []
    for i in range(n):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        sentence = sentence[0].upper() + sentence[1:]
        # Some digits, questions and line breaks, so those bytes get merges too.
        if i % 5 == 0:
            sentence += f", {rng.randint(0, 999)} times"
        sentences.append(sentence + ("?" if i % 7 == 0 else ".") + ("\n" if i % 3 == 0 else ""))
    return sentences


SLIDING_WINDOW = 8  # small enough that short test sequences cross it

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    # Some default configs carry token ids of their original vocab (e.g. phi3 pad=32000), which
    # would index outside a tiny vocab; tiny_model fills them in from the tokenizer.
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
    attn_implementation="sdpa",
)

_MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01)

_ARCHS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=SLIDING_WINDOW),
    "qwen2": {},
    "phi3": dict(original_max_position_embeddings=2048),
    "gemma2": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        # Gemma2 refuses sdpa: its attention logit softcapping has no sdpa path.
        attn_implementation="eager",
    ),
    "mixtral": dict(num_local_experts=4, **_MOE),
    "qwen2_moe": dict(
        num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128, **_MOE
    ),
}

ARCHS = tuple(_ARCHS)


def tiny_config(arch: str, vocab_size: int, **overrides) -> PretrainedConfig:
    """A 2-layer, hidden-64 config of `arch`; `overrides` (any config field, or
    `attn_implementation`) are applied last.

    Attention is sdpa except for gemma2, which only runs eager. mistral and gemma2 (its even
    layers) use a sliding window of `SLIDING_WINDOW` tokens; mixtral and qwen2_moe have 4 experts,
    top-2, and return router logits (so `aux_loss`) by default.
    """
    if arch not in _ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; tiny_config supports {', '.join(ARCHS)}.")
    # Everything goes through the constructor, since some fields (e.g. layer_types) are derived there.
    return AutoConfig.for_model(arch, **{**_COMMON, **_ARCHS[arch], "vocab_size": vocab_size, **overrides})


def tiny_model(
    arch: str,
    tokenizer_or_vocab_size: PreTrainedTokenizerFast | int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM; the same `seed` gives the same weights.

    Given a tokenizer, the vocab covers all its tokens and the config's pad/bos/eos ids are its own.
    """
    if isinstance(tokenizer_or_vocab_size, int):
        token_fields = {"vocab_size": tokenizer_or_vocab_size}
    else:
        tokenizer = tokenizer_or_vocab_size
        token_fields = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    fields = {**token_fields, **overrides}
    config = tiny_config(arch, fields.pop("vocab_size"), **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `path`, loadable with `from_pretrained(path)`."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _pair_texts(tokenizer: PreTrainedTokenizerFast, row: dict) -> tuple[str, str]:
    """A preference row's chosen and rejected conversations as the reward model reads them (`rewards.render`)."""
    from .rewards import render

    def answer(value):
        return value if isinstance(value, str) else value[-1]["content"]  # chat rows: the assistant turn

    return tuple(render(tokenizer, row["prompt"], answer(row[k]))[0] for k in ("chosen", "rejected"))


def _corpus(rows: list[dict]) -> list[str]:
    """The rows' texts, chat rows with their role names, to train a tokenizer on."""
    texts = []
    for row in rows:
        for key in ("chosen", "rejected"):
            if isinstance(row["prompt"], str):
                texts.append(row["prompt"] + row[key])
            else:
                texts.append("".join(f"{m['role']}\n{m['content']}\n" for m in row["prompt"] + row[key]))
    return texts


def train_reward_model(
    rows: list[dict],
    path: str | Path | None = None,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    chat_template: str | None = "chatml",
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny num_labels=1 `LlamaForSequenceClassification` and train it on preference `rows`
    (text or chat, e.g. `demo.make_rows`) with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

    Plain torch, AdamW with a linear decay, `batch_size` pairs a step drawn with `seed`; on 2000
    demo chat rows the defaults reach ~0.85 held-out pair accuracy in ~20 s on one core. Without a `tokenizer` one is
    trained on the rows' texts (vocab 300, `chat_template`). Given `path`, it is saved there like
    `save_tiny` (loadable with AutoModelForSequenceClassification / AutoTokenizer). Returns both.
    """
    from transformers import LlamaForSequenceClassification

    if tokenizer is None:
        tokenizer = train_tokenizer(_corpus(rows), vocab_size=300, chat_template=chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = tiny_config("llama", len(tokenizer), num_labels=1, pad_token_id=pad,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    encoded = [[tokenizer(t, add_special_tokens=False)["input_ids"] for t in _pair_texts(tokenizer, r)] for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear to 0: settles
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        pairs = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        seqs = [c for c, _ in pairs] + [r for _, r in pairs]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(rewards[:batch_size] - rewards[batch_size:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    model.eval()
    if path is not None:
        save_tiny(model, tokenizer, path)
    return model, tokenizer
