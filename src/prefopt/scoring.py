"""How the model's LM head scores a batch: one interface (`step.Scorer`), three implementations,
chosen once per run by `choose_scorer` and named in one log line.

- `FusedHead`: a plain `nn.Linear` head read directly by the fused chunked kernel
  (`logprobs._FusedHeadLogps`: only log-sum-exps kept, logits recomputed in backward). A frozen head
  that ZeRO-3 partitions qualifies: the kernel gathers it around forward and backward.
- `ModuleHead`: the head called as a module inside `torch.utils.checkpoint`, chunk by chunk, for
  heads that must be: a trainable ZeRO-3 head (its hooks gather it and take its gradient), FSDP (a
  sharded weight), LoRA or quantized heads (the module is not a Linear), soft-capped or scaled
  logits (`logprobs.head_transform`). It is also the scorer of the diversity term: its chunks hold
  each aligned chosen/rejected pair together and yield log-probs, entropy and KL from the logits
  formed once (the fused kernel keeps no logits, so the term always runs here).
- `OwnHead`: a tied head under FSDP cannot be a unit apart from the embeddings, so the model's
  own head call computes the scored columns (`logits_to_keep` = those columns): [rows, columns, V]
  logits exist at once, the one path without chunking. Entropy and KL come from those logits.

Each returns `logprobs.TokenScores` for the batch's scored positions and the forward's MoE router
loss. The model is always called as the wrapped module (DDP/DeepSpeed/FSDP hooks run as usual).
"""

from dataclasses import dataclass

import torch

from .attention import model_inputs
from .diversity import entropy, kl
from .logprobs import (TokenScores, chunk_size_for, frozen_zero3_copy, fusable, head_transform, logps_from_logits,
                       run_chunk, scored_hidden, token_logps)
from .step import DiversityRows

Tensor = torch.Tensor


class OutputHead(torch.nn.Linear):
    """The LM head under FSDP: a plain Linear with a class of its own, so the wrap policy can make
    it a separate FSDP unit (`prepare_head_for_fsdp`)."""


def prepare_head_for_fsdp(model, plugin) -> bool:
    """Make an untied LM head its own FSDP unit, so calling it after the model's forward gathers and
    frees its weight through its own hooks (accelerate otherwise groups it with the final norm, and
    a second call of that group outside the model's forward crashed in backward). Returns whether
    the head is tied to the embeddings (then `OwnHead` scores through the model's own call)."""
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        return True
    if type(head) is torch.nn.Linear:
        head.__class__ = OutputHead
    if type(head) is OutputHead and plugin.auto_wrap_policy is not None:
        names = plugin.transformer_cls_names_to_wrap
        if names is None:
            names = list(getattr(model, "_no_split_modules", None) or [])
        plugin.transformer_cls_names_to_wrap = [*names, OutputHead.__name__]
    return False


@dataclass
class _Scorer:
    unwrapped: torch.nn.Module  # the model inside any wrapper: its config, dtype and head
    chunk: int  # scored positions per head chunk
    transform: object = None  # soft-cap / scaling of the logits (logprobs.head_transform)
    aux: bool = False  # ask the forward for the MoE router loss
    diversity: bool = False
    why: str = ""

    def _forward(self, model, batch: dict, **kwargs):
        inputs = {"input_ids": batch["input_ids"], **model_inputs(batch, self.unwrapped.config, self.unwrapped.dtype),
                  "use_cache": False, **({"output_router_logits": True} if self.aux else {})}
        return model(**inputs, **kwargs)



class ModuleHead(_Scorer):
    fused = False

    @property
    def name(self) -> str:
        return f"checkpointed LM-head module, {self.chunk} positions per chunk ({self.why})"

    def __call__(self, model, batch: dict, rows: DiversityRows | None):
        # the model's own head sees one position; ours sees the scored ones, in chunks
        out = self._forward(model, batch, output_hidden_states=True, logits_to_keep=1)
        hidden, head = out.hidden_states[-1], self.unwrapped.get_output_embeddings()
        if rows is None:
            tok = token_logps(hidden, batch["score_index"], batch["score_target"], head, self.transform, self.chunk,
                              fused=self.fused)
        else:
            h = scored_hidden(hidden, batch["score_index"], head)
            tok = score_with_diversity(h, batch["score_target"], rows, frozen_zero3_copy(head) or head, self.transform,
                                       self.chunk)
        return tok, out.aux_loss if self.aux else None


class FusedHead(ModuleHead):
    fused = True  # (never asked for the diversity term: choose_scorer gives that to ModuleHead)

    @property
    def name(self) -> str:
        return f"fused LM head, {self.chunk} positions per chunk"


class OwnHead(_Scorer):
    @property
    def name(self) -> str:
        return f"the model's own head on the scored columns ({self.why})"

    def __call__(self, model, batch: dict, rows: DiversityRows | None):
        T = batch["input_ids"].shape[1]
        columns, where = torch.unique(batch["score_index"] % T, return_inverse=True)
        out = self._forward(model, batch, logits_to_keep=columns)
        z = out.logits[batch["score_index"] // T, where]  # [N, V]: scored position i at its row, kept column
        tok = logps_from_logits(z, batch["score_target"])
        if rows is not None:
            logp = torch.log_softmax(z.float(), dim=-1)
            tok.entropy_sum = entropy(logp[rows.chosen]).sum()
            tok.kl_sum = kl(logp[rows.pairs_r], logp[rows.pairs_c]).sum()
        return tok, out.aux_loss if self.aux else None


def choose_scorer(unwrapped, *, fsdp: bool, tied_under_fsdp: bool, diversity: bool, chunk: int | None = None,
                  aux: bool = False) -> _Scorer:
    """The scorer for this run's model, head and objective (see the module docstring)."""
    config = unwrapped.config
    transform = head_transform(config)
    common = dict(unwrapped=unwrapped, chunk=chunk_size_for(config.get_text_config().vocab_size, chunk),
                  transform=transform, aux=aux, diversity=diversity)
    head = unwrapped.get_output_embeddings()
    if tied_under_fsdp:
        return OwnHead(**common, why="a head tied to the embeddings under FSDP")
    if diversity:
        return ModuleHead(**common, why="the diversity term's entropy and KL")
    if fsdp:
        return ModuleHead(**common, why="FSDP shards the head")
    if fusable(head, transform):
        return FusedHead(**common)
    why = ("the logits are soft-capped or scaled" if transform is not None
           else "a trainable head partitioned by ZeRO-3" if hasattr(getattr(head, "weight", None), "ds_id")
           else f"the head is a {type(head).__name__}, not a plain Linear (LoRA, quantized)")
    return ModuleHead(**common, why=why)


# -- the diversity term's chunks ---------------------------------------------------------------


def _rows(h: Tensor, target: Tensor, head, transform) -> tuple[Tensor, Tensor, Tensor]:
    """log p(target), mean logit and the log-softmax of each row (one head matmul)."""
    z = head(h).float()
    if transform is not None:
        z = transform(z)
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, target[:, None]).squeeze(-1), z.detach().mean(-1), logp


def _pair_chunk(h_c, t_c, h_r, t_r, head, transform):
    lp_c, m_c, logp_c = _rows(h_c, t_c, head, transform)
    lp_r, m_r, logp_r = _rows(h_r, t_r, head, transform)
    return lp_c, m_c, lp_r, m_r, entropy(logp_c), kl(logp_r, logp_c)


def _single_chunk(h, t, head, transform):
    lp, m, logp = _rows(h, t, head, transform)
    return lp, m, entropy(logp)


def score_with_diversity(h: Tensor, target: Tensor, rows: DiversityRows, head, transform, chunk: int) -> TokenScores:
    """Log-probs and mean logits of every scored row ([N] each), Σ entropy over the chosen
    completion rows and Σ KL(p_r ‖ p_c) over the aligned pairs — each row's logits formed once,
    `chunk` rows at a time, each aligned pair in one chunk, recomputed in backward."""
    N = h.shape[0]
    logps = h.new_zeros(N, dtype=torch.float32)
    means = h.new_zeros(N, dtype=torch.float32)
    total_h, total_kl = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    run = lambda f, *a: run_chunk(f, *a, head, transform)  # noqa: E731
    done = torch.zeros(N, dtype=torch.bool, device=h.device)
    step = max(1, chunk // 2)
    for s in range(0, len(rows.pairs_c), step):
        c, r = rows.pairs_c[s : s + step], rows.pairs_r[s : s + step]
        lp_c, m_c, lp_r, m_r, e, k = run(_pair_chunk, h[c], target[c], h[r], target[r])
        logps, means = logps.index_put((c,), lp_c).index_put((r,), lp_r), means.index_put((c,), m_c).index_put((r,), m_r)
        total_h, total_kl = total_h + e.sum(), total_kl + k.sum()
        done[c], done[r] = True, True
    single = rows.chosen[~done[rows.chosen]]
    rest = torch.nonzero(~done).squeeze(1)  # the rows not in a pair and not chosen: no entropy needed
    rest = rest[~torch.isin(rest, single)]
    for group, with_entropy in ((single, True), (rest, False)):
        for s in range(0, len(group), chunk):
            part = group[s : s + chunk]
            lp, m, e = run(_single_chunk, h[part], target[part])
            logps, means = logps.index_put((part,), lp), means.index_put((part,), m)
            if with_entropy:
                total_h = total_h + e.sum()
    return TokenScores(logps, means, total_h, total_kl)
