"""How the model's LM head scores a batch: one interface (`step.Scorer`), three implementations,
chosen once per run by `choose_scorer` and named in one log line.

- `FusedHead`: a plain `nn.Linear` head read directly by the fused chunked kernels
  (`logprobs._FusedHeadLogps`, and `_FusedHeadDiversity` with the diversity term: only log-sum-exps
  kept, logits recomputed once in backward). A frozen head that ZeRO-3 partitions qualifies: the
  kernels gather it around forward and backward.
- `ModuleHead`: the head called as a module inside `torch.utils.checkpoint`, chunk by chunk, for
  heads that must be: a trainable ZeRO-3 head (its hooks gather it and take its gradient), FSDP (a
  sharded weight), LoRA or quantized heads (the module is not a Linear), soft-capped or scaled
  logits (`logprobs.head_transform`).
- `OwnHead`: a tied head under FSDP cannot be a unit apart from the embeddings, so the model's
  own head call computes the scored columns (`logits_to_keep` = those columns): [rows, columns, V]
  logits exist at once, the one path without chunking. Entropy and KL come from those logits.

With the diversity term, FusedHead (`logprobs._FusedHeadDiversity`) and ModuleHead
(`score_with_diversity`) take the same chunks (`logprobs.diversity_groups`: each aligned
chosen/rejected pair in one chunk) and yield log-probs, entropy and KL from each chunk's logits,
formed once.

Each returns `logprobs.TokenScores` for the batch's scored positions and the forward's MoE router
loss. The model is always called as the wrapped module (DDP/DeepSpeed/FSDP hooks run as usual).
"""

from dataclasses import dataclass, field

import torch

from .attention import model_inputs
from .diversity import entropy, kl
from .logprobs import (TokenScores, chunk_size_for, diversity_groups, frozen_zero3_copy, fusable, fused_diversity_scores,
                       head_transform, keep_rows_for, logps_from_logits, run_chunk, scored_hidden, token_logps)
from .gradahead import Ahead, Workspace, ahead_scores
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
    keep: int = 0  # rows whose softmax the fused head keeps for backward (logprob_keep_mb)
    transform: object = None  # soft-cap / scaling of the logits (logprobs.head_transform)
    aux: bool = False  # ask the forward for the MoE router loss
    diversity: bool = False
    why: str = ""
    # the fused head's buffer for its groups' logits, reused from step to step (gradahead.Workspace)
    workspace: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    def _forward(self, model, batch: dict, **kwargs):
        inputs = {"input_ids": batch["input_ids"], **model_inputs(batch, self.unwrapped.config, self.unwrapped.dtype),
                  "use_cache": False, **({"output_router_logits": True} if self.aux else {})}
        return model(**inputs, **kwargs)



class ModuleHead(_Scorer):
    fused = False

    @property
    def name(self) -> str:
        return f"checkpointed LM-head module, {self.chunk} positions per chunk ({self.why})"

    def __call__(self, model, batch: dict, rows: DiversityRows | None, ahead: Ahead | None = None):
        # the model's own head sees one position; ours sees the scored ones, in chunks
        out = self._forward(model, batch, output_hidden_states=True, logits_to_keep=1)
        hidden, head = out.hidden_states[-1], self.unwrapped.get_output_embeddings()
        if rows is not None:
            h = scored_hidden(hidden, batch["score_index"], head)
            if self.fused:
                tok = fused_diversity_scores(h, batch["score_target"], rows.pairs_c, rows.pairs_r, rows.chosen, head,
                                             self.chunk)
            else:
                tok = score_with_diversity(h, batch["score_target"], rows, frozen_zero3_copy(head) or head,
                                           self.transform, self.chunk)
        else:
            tok = None
            if ahead is not None and self.fused:  # the head's gradient formed in forward, where it applies
                tok = ahead_scores(hidden, batch["score_index"], batch["score_target"], head, self.chunk, self.keep,
                                   ahead, self.workspace)
            if tok is None:
                tok = token_logps(hidden, batch["score_index"], batch["score_target"], head, self.transform,
                                  self.chunk, fused=self.fused, keep=self.keep)
        return tok, out.aux_loss if self.aux else None


class FusedHead(ModuleHead):
    fused = True

    @property
    def name(self) -> str:
        kept = (f", its gradient formed in forward a group of whole pairs at a time (the softmax of up to {self.keep} "
                "positions at once)" if self.keep and not self.diversity else "")
        return (f"fused LM head, {self.chunk} positions per chunk{kept}"
                + (" (with the diversity term)" if self.diversity else ""))


class OwnHead(_Scorer):
    @property
    def name(self) -> str:
        return f"the model's own head on the scored columns ({self.why})"

    def __call__(self, model, batch: dict, rows: DiversityRows | None, ahead=None):
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
                  keep_mb: int = 0, aux: bool = False) -> _Scorer:
    """The scorer for this run's model, head and objective (see the module docstring)."""
    config = unwrapped.config
    transform = head_transform(config)
    vocab = config.get_text_config().vocab_size
    common = dict(unwrapped=unwrapped, chunk=chunk_size_for(vocab, chunk), transform=transform, aux=aux,
                  diversity=diversity)
    head = unwrapped.get_output_embeddings()
    if tied_under_fsdp:
        return OwnHead(**common, why="a head tied to the embeddings under FSDP")
    if fsdp:
        return ModuleHead(**common, why="FSDP shards the head")
    if fusable(head, transform):
        return FusedHead(**common, keep=keep_rows_for(vocab, keep_mb))
    why = ("the logits are soft-capped or scaled" if transform is not None
           else "a trainable head partitioned by ZeRO-3" if hasattr(getattr(head, "weight", None), "ds_id")
           else f"the head is a {type(head).__name__}, not a plain Linear (LoRA, quantized)")
    return ModuleHead(**common, why=why)


# -- the diversity term's chunks, through the head module ---------------------------------------


def _group_chunk(h: Tensor, target: Tensor, k: int, with_entropy: bool, head, transform):
    """One chunk of `logprobs.diversity_groups`: log p(target) and the mean logit of each row, Σ
    entropy (of the first k rows, the chosen side of the aligned pairs, or of all rows when k = 0)
    and Σ KL(p_r ‖ p_c) of the k pairs — from one head matmul."""
    z = head(h).float()
    if transform is not None:
        z = transform(z)
    logp = torch.log_softmax(z, dim=-1)
    zero = logp.new_zeros(())
    ent = entropy(logp[:k] if k else logp).sum() if with_entropy else zero
    div = kl(logp[k:], logp[:k]).sum() if k else zero
    return logp.gather(-1, target[:, None]).squeeze(-1), z.detach().mean(-1), ent, div


def score_with_diversity(h: Tensor, target: Tensor, rows: DiversityRows, head, transform, chunk: int) -> TokenScores:
    """Log-probs and mean logits of every scored row ([N] each), Σ entropy over the chosen
    completion rows and Σ KL(p_r ‖ p_c) over the aligned pairs — each row's logits formed once,
    `chunk` rows at a time, each aligned pair in one chunk, recomputed in backward."""
    N = h.shape[0]
    logps = h.new_zeros(N, dtype=torch.float32)
    means = h.new_zeros(N, dtype=torch.float32)
    total_h, total_kl = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    for part, k, with_entropy in diversity_groups(N, rows.pairs_c, rows.pairs_r, rows.chosen, chunk, h.device):
        lp, m, e, d = run_chunk(_group_chunk, h[part], target[part], k, with_entropy, head, transform)
        logps, means = logps.index_put((part,), lp), means.index_put((part,), m)
        total_h, total_kl = total_h + e, total_kl + d
    return TokenScores(logps, means, total_h, total_kl)
