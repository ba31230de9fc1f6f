"""The policy's answers for `prefopt pairs`: prompts rendered as training renders them, sampled by an
engine, one answer per prompt and seed.

    engine = open_engine(cfg, device)          # transformers (any machine) or vLLM (installed + a GPU)
    answers = engine.sample(prompt_ids, seed)  # list[Answer], one per prompt, the same for a seed

A prompt is what training puts before an answer: a chat prompt is the policy's chat template with
the generation prompt added, a text prompt its text; BOS first where the tokenizer has one and the
rendering did not put it there, as `tokens._split_ids` does. Generation stops at every EOS id the
policy's generation config and tokenizer name.

Reproducible: with transformers, a batch is sampled from a generator seeded with (seed, the batch's
first prompt index), so a prompt's answer for a seed depends on the seed, the batch size and where
its batch starts, never on the process that ran it or on an earlier run that was stopped; vLLM
seeds each request with (seed, prompt index).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import PrefoptError


@dataclass
class Answer:
    text: str
    tokens: int  # generated tokens, up to and excluding the stopping EOS
    stopped: bool  # ended at an EOS (else it ran to max_new_tokens)


def derived_seed(seed: int, index: int) -> int:
    """A 63-bit seed for (seed, index): neighbouring seeds and indices give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def render_prompt(tokenizer, prompt, where: str, style=None) -> list[int]:
    """`prompt` (text, or a list of messages) as the token ids an answer follows: a chat prompt as
    `templates.generation_prompt` renders it for the run's `style` (`templates.rendering`)."""
    from .templates import Rendering, generation_prompt

    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        text = generation_prompt(tokenizer, prompt, where, style or Rendering())
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def answer_text(tokenizer, prompt: list[int], answer: list[int]) -> str:
    """The answer's text as it reads after its prompt: decoded with the prompt and the prompt's text
    cut off, since a SentencePiece tokenizer decoding the answer alone drops its first space
    (" how" -> "how"), and training, joining prompt and answer text, would tokenize another answer."""
    alone = tokenizer.decode(answer, skip_special_tokens=True)
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + answer, skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else alone


def stop_ids(generation_config, tokenizer) -> list[int]:
    """Every EOS id the policy's generation config names, and the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({i for i in eos + [tokenizer.eos_token_id] if i is not None})


class TransformersEngine:
    """`model.generate` on left-padded batches; any machine."""

    name = "transformers"

    def __init__(self, model, tokenizer, settings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.eos = stop_ids(model.generation_config, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        from transformers import GenerationConfig

        # the settings alone: not the policy's generation_config.json (a repetition_penalty in it would
        # sample another distribution than the one asked for, and than the vLLM engine's)
        self.config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                       max_new_tokens=settings.max_new_tokens, eos_token_id=self.eos,
                                       pad_token_id=self.pad)
        # generate() fills what a given config leaves at its default from the model's own: replaced, it has none
        model.generation_config = self.config

    def sample(self, prompts: list[list[int]], seed: int, first_index: int) -> list[Answer]:
        width = max(len(p) for p in prompts)
        device = self.model.device
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        generator_state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(derived_seed(seed, first_index))  # seeds the CPU and every CUDA device
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.config)
        finally:  # the caller's random stream is left as it was
            torch.random.set_rng_state(generator_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
        return [self._answer(p, row) for p, row in zip(prompts, out[:, width:].tolist())]

    def _answer(self, prompt: list[int], row: list[int]) -> Answer:
        stop = next((i for i, t in enumerate(row) if t in self.eos), None)
        kept = row if stop is None else row[:stop]
        return Answer(answer_text(self.tokenizer, prompt, kept), len(kept), stop is not None)


class VllmEngine:
    """vLLM's `LLM.generate` with token-id prompts: a GPU and the `vllm` package."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, settings, eos: list[int], trust_remote_code: bool, dtype,
                 revision: str = "main"):
        from vllm import LLM

        self.settings, self.tokenizer, self.eos = settings, tokenizer, eos
        # vLLM takes gpu_memory_utilization of the GPU for itself; the rest holds the reward model
        self.llm = LLM(model=model_path, tokenizer=model_path, trust_remote_code=trust_remote_code,
                       dtype=dtype or "auto", seed=0, revision=revision,
                       gpu_memory_utilization=settings.vllm_gpu_memory_utilization)

    def sample(self, prompts: list[list[int]], seed: int, first_index: int) -> list[Answer]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=self.settings.temperature, top_p=self.settings.top_p,
                                 max_tokens=self.settings.max_new_tokens, stop_token_ids=self.eos,
                                 seed=derived_seed(seed, first_index + i) % (2**31), skip_special_tokens=True)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        answers = []
        for prompt, out in zip(prompts, outs):
            done = out.outputs[0]
            ids = list(done.token_ids)
            stop = next((i for i, t in enumerate(ids) if t in self.eos), None)
            kept = ids if stop is None else ids[:stop]
            answers.append(Answer(answer_text(self.tokenizer, prompt, kept), len(kept), done.finish_reason == "stop"))
        return answers


def vllm_available() -> tuple[bool, str]:
    """Whether vLLM can run here, and if not, why (for the refusal)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "the vllm package is not installed (pip install vllm)"
    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and torch sees none"
    return True, ""


def choose_engine(asked: str) -> str:
    """auto: vllm where it can run, else transformers; vllm asked where it cannot run is refused."""
    can, why = vllm_available()
    if asked == "vllm" and not can:
        raise PrefoptError(f"engine: vllm cannot run here: {why}. Set `engine: transformers` (any machine) or "
                           "`engine: auto`.")
    if asked == "auto":
        return "vllm" if can else "transformers"
    return asked
