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


def render_prompt(tokenizer, prompt, where: str) -> list[int]:
    """`prompt` (text, or a list of messages) as the token ids an answer follows."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own error (a role it does not take, a raise_exception)
            raise PrefoptError(f"{where}: the policy's chat template could not render the prompt: {e}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


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
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=self.settings.temperature,
                    top_p=self.settings.top_p, top_k=0, max_new_tokens=self.settings.max_new_tokens,
                    eos_token_id=self.eos, pad_token_id=self.pad)
        finally:  # the caller's random stream is left as it was
            torch.random.set_rng_state(generator_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
        return [self._answer(row) for row in out[:, width:].tolist()]

    def _answer(self, row: list[int]) -> Answer:
        stop = next((i for i, t in enumerate(row) if t in self.eos), None)
        kept = row if stop is None else row[:stop]
        return Answer(self.tokenizer.decode(kept, skip_special_tokens=True), len(kept), stop is not None)


class VllmEngine:
    """vLLM's `LLM.generate` with token-id prompts: a GPU and the `vllm` package."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, settings, eos: list[int], trust_remote_code: bool, dtype):
        from vllm import LLM

        self.settings, self.tokenizer, self.eos = settings, tokenizer, eos
        self.llm = LLM(model=model_path, tokenizer=model_path, trust_remote_code=trust_remote_code,
                       dtype=dtype or "auto", seed=0)

    def sample(self, prompts: list[list[int]], seed: int, first_index: int) -> list[Answer]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=self.settings.temperature, top_p=self.settings.top_p,
                                 max_tokens=self.settings.max_new_tokens, stop_token_ids=self.eos,
                                 seed=derived_seed(seed, first_index + i) % (2**31), skip_special_tokens=True)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        answers = []
        for out in outs:
            done = out.outputs[0]
            ids = [t for t in done.token_ids if t not in self.eos]
            answers.append(Answer(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids),
                                  done.finish_reason == "stop"))
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
