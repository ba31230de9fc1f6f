"""The peers a user would pick instead of plain TRL, as bench.py runs them: TRL 1.16's experimental
CPOTrainer / ORPOTrainer with the LM head and the loss handed to

- liger: Liger-Kernel's chunked fused-linear preference losses (`liger_kernel.chunked_loss`): the
  head, log-softmax and loss of one pair at a time, each chunk's gradient taken inside the forward
  (torch.func.grad_and_value, torch.compile'd), so no [2B, T, V] logits;
- cce: cut-cross-entropy's `linear_cross_entropy`: the per-token losses of the labelled positions
  only, then TRL's own loss functions on their sums or means. Its Triton kernel (impl "cce") needs
  a GPU driver; on CPU only impl "torch_compile" runs (`cce_kernel_on_cpu` records why), which
  forms the logits of the labelled positions in one piece and lets torch.compile fuse the rest.

TRL 1.16's experimental trainers have no switch for either, so each peer is a small subclass whose
forward runs the model body (`model.get_decoder()`: embeddings, layers, final norm; no head) and
hands its last hidden state, the head weight and TRL's labels to the library, as a user wiring it
into TRL would. Tokenisation, the padding collator, chosen and rejected concatenated with the prompt
in each, the optimizer and the loop stay TRL's, and so does the objective: bench.py checks each
peer's first-step loss against TRL's on the same batch.
"""

from __future__ import annotations

import torch
from cut_cross_entropy import linear_cross_entropy
from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss, LigerFusedLinearSimPOLoss
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

HEADS = {
    "liger": "LigerFusedLinearSimPOLoss / LigerFusedLinearORPOLoss (Liger's defaults: chunk_size 1 pair, compiled)",
    "cce": 'cut-cross-entropy linear_cross_entropy(impl="torch_compile", reduction="none", shift=True)',
}


def _body(trainer, model, batch, pad: int):
    """TRL's concatenated batch (chosen rows, then rejected rows, padded to one length), the body's
    last hidden state [2B, T, H] and the LM head weight [V, H]."""
    cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad,
                                      device=trainer.accelerator.device)
    hidden = model.get_decoder()(input_ids=cat["concatenated_input_ids"],
                                 attention_mask=cat["concatenated_attention_mask"], use_cache=False).last_hidden_state
    return cat, hidden, model.get_output_embeddings().weight


def _prompt_and_chosen(cat: dict) -> torch.Tensor:
    """Labels of ORPO's NLL: every real token of the row (prompt + completion), as TRL's ORPO reads them."""
    return torch.where(cat["concatenated_attention_mask"] == 1, cat["concatenated_input_ids"], -100)


def _metrics(train_eval: str, beta: float, chosen, rejected, nll, **extra) -> dict:
    """TRL's logged metrics from the sequence log-probs [B] and the NLL, as floats."""
    c, r = beta * chosen.detach(), beta * rejected.detach()
    m = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracies": (c > r).float().mean(),
         "rewards/margins": (c - r).mean(), "logps/chosen": chosen.detach().mean(),
         "logps/rejected": rejected.detach().mean(), "nll_loss": nll.detach(), **extra}
    prefix = "eval_" if train_eval == "eval" else ""
    return {prefix + k: float(v) for k, v in m.items()}


def _refuse_other_objectives(trainer):
    """The peers implement the benchmark's objectives only (CPO-SimPO: loss_type simpo, alpha 0; ORPO),
    with no MoE router loss: anything else would train another objective than TRL's."""
    cpo = isinstance(trainer, CPOTrainer)
    other_cpo = cpo and (trainer.loss_type != "simpo" or trainer.alpha != 0.0)
    if other_cpo or trainer.aux_loss_enabled:
        name = "CPOTrainer" if cpo else "ORPOTrainer"
        got = f"loss_type {trainer.loss_type!r}, alpha {trainer.alpha}, " if cpo else ""
        raise ValueError(f"peers.py: {got}router aux loss {trainer.aux_loss_enabled}: the peer of {name} trains "
                         f"{'loss_type simpo with alpha 0' if cpo else 'ORPO'} without a router loss; set those in "
                         f"the config or train with TRL's {name}")


class LigerCPOTrainer(CPOTrainer):
    """TRL's CPO-SimPO through LigerFusedLinearSimPOLoss, which computes exactly TRL's objective:

        mean_i −log σ(β·(ℓ_c − ℓ_r) − γ) + α · NLL

    ℓ = the completion's mean token log-prob (Liger's base averages unless told otherwise; TRL averages
    for loss_type simpo); γ = simpo_gamma, absolute (TRL subtracts γ/β and then multiplies by β); NLL =
    the mean over every chosen completion token of the batch (Liger: the chunks' sums over the batch's
    chosen token count; TRL: CrossEntropyLoss over the chosen rows); α = cpo_alpha. (Liger's CPO loss
    has no margin γ, so it is not this objective.)"""

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        _refuse_other_objectives(self)
        cat, hidden, weight = _body(self, model, batch, self.pad_token_id)
        loss_fn = LigerFusedLinearSimPOLoss(beta=self.beta, gamma=self.simpo_gamma, alpha=self.cpo_alpha,
                                            label_smoothing=self.label_smoothing,
                                            compute_nll_loss=self.cpo_alpha != 0)
        # position t predicts token t + 1: the last position predicts nothing, the first token is never predicted
        loss, (chosen, rejected, logits_c, logits_r, nll, *_) = loss_fn(
            weight, hidden[:, :-1], cat["concatenated_labels"][:, 1:])
        return loss, _metrics(train_eval, self.beta, chosen, rejected, nll,
                              **{"logits/chosen": logits_c, "logits/rejected": logits_r})


class LigerORPOTrainer(ORPOTrainer):
    """TRL's ORPO through LigerFusedLinearORPOLoss: NLL − mean_i λ·log σ(log odds(ℓ_c) − log odds(ℓ_r)),
    ℓ the completion's mean token log-prob, λ = beta, the NLL (weight 1, Liger's default alpha) over the
    chosen row's prompt and completion tokens as TRL's ORPO computes it (`nll_target`)."""

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        _refuse_other_objectives(self)
        cat, hidden, weight = _body(self, model, batch, self.padding_value)
        loss_fn = LigerFusedLinearORPOLoss(beta=self.beta, compute_nll_loss=True)
        loss, (chosen, rejected, logits_c, logits_r, nll, _, _, ratio, log_odds) = loss_fn(
            weight, hidden[:, :-1], cat["concatenated_labels"][:, 1:], nll_target=_prompt_and_chosen(cat)[:, 1:])
        return loss, _metrics(train_eval, self.beta, chosen, rejected, nll, log_odds_ratio=ratio,
                              log_odds_chosen=log_odds, **{"logits/chosen": logits_c, "logits/rejected": logits_r})


def _cce_logps(trainer, model, batch, pad: int, nll_over_prompt: bool, want_nll: bool):
    """TRL's concatenated_forward with the head and log-softmax of cut-cross-entropy: sequence log-probs
    [B] (chosen, rejected; the mean over the completion, as TRL's CPO-SimPO and ORPO take it) and the
    chosen NLL (mean over the completion tokens, or over prompt + completion with `nll_over_prompt`),
    from one call on the labelled positions. TRL's logits metrics would need the logits this path
    never forms: NaN."""
    cat, hidden, weight = _body(trainer, model, batch, pad)
    labels = cat["concatenated_labels"]
    B = labels.shape[0] // 2
    targets = labels.clone()
    if nll_over_prompt:
        targets[:B] = _prompt_and_chosen(cat)[:B]
    # shift=True: hidden t scores target t + 1; out [2B, T − 1], 0 where the target is -100
    logp = -linear_cross_entropy(hidden, weight, targets, impl="torch_compile", reduction="none", shift=True)
    mask = labels[:, 1:] != -100
    logps = (logp * mask).sum(-1) / mask.sum(-1)
    nll = torch.zeros((), device=logp.device)
    if want_nll:
        nll_mask = targets[:B, 1:] != -100
        nll = -(logp[:B] * nll_mask).sum() / nll_mask.sum()
    nan = torch.full((), float("nan"), device=logp.device)
    return logps[:B], logps[B:], nan, nan, nll


class CCECPOTrainer(CPOTrainer):
    """TRL's CPO-SimPO (`cpo_loss` and the rest of TRL's step unchanged) on cut-cross-entropy's log-probs."""

    def concatenated_forward(self, model, batch):
        _refuse_other_objectives(self)
        return _cce_logps(self, model, batch, self.pad_token_id, nll_over_prompt=False, want_nll=self.cpo_alpha != 0)


class CCEORPOTrainer(ORPOTrainer):
    """TRL's ORPO (`odds_ratio_loss` and the rest of TRL's step unchanged) on cut-cross-entropy's log-probs."""

    def concatenated_forward(self, model, batch):
        _refuse_other_objectives(self)
        return _cce_logps(self, model, batch, self.padding_value, nll_over_prompt=True, want_nll=True)


TRAINERS = {
    ("liger", "cpo"): (CPOConfig, LigerCPOTrainer), ("liger", "orpo"): (ORPOConfig, LigerORPOTrainer),
    ("cce", "cpo"): (CPOConfig, CCECPOTrainer), ("cce", "orpo"): (ORPOConfig, CCEORPOTrainer),
}


def cce_kernel_on_cpu() -> str:
    """What cut-cross-entropy's own kernel (impl "cce") does with CPU tensors: its error, or "runs"."""
    e, c = torch.randn(1, 4, 8), torch.randn(16, 8)
    try:
        linear_cross_entropy(e, c, torch.zeros(1, 4, dtype=torch.long), impl="cce")
    except Exception as exc:  # noqa: BLE001 - the message is the finding, recorded in the results
        return f"fails ({type(exc).__name__}: {str(exc)[:160].rstrip('.')})"
    return "runs"
