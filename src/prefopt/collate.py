"""Collation: tokenized pairs → the rows of one forward pass, plus which positions to score.

Every layout returns the same batch contract, so the log-prob helper and the loss never know
which layout made it:

    input_ids            [R, T]  token ids (padding is arbitrary: masks come from lengths)
    attention_mask       [R, T]  1 on real tokens
    score_index          [N]     flat index r·T + t of each position whose *next* token is scored
    score_target         [N]     that next token
    score_seq            [N]     which sequence it belongs to: pair i's chosen is i, its rejected B + i
    score_is_completion  [N]     True on completion tokens; False on prompt tokens, which are
                                 scored only when an NLL term spans the prompt (ORPO)
    source, row                  provenance of each pair, for error messages

Layouts:

- "padded" (the reference): rows are [prompt; chosen] for each pair, then [prompt; rejected]
  for each pair, right-padded to the longest. A 2-D `attention_mask`.
- "shared": one row per pair, [prompt][chosen][rejected]. The rejected branch restarts its
  position ids where the prompt ends and may not attend to the chosen branch, so it sees exactly
  what it would see in its own row — but the prompt is computed once, not twice.
- "packed": as "shared", with several triples per row (first-fit decreasing, up to
  `pack_length` tokens), each attending only within itself: padding only at the rows' tails.

"shared" and "packed" replace `attention_mask` with per-token ids, from which attention.py
builds the mask (`attention.model_inputs`):

    position_ids  [R, T]  position within the triple (rejected restarts after the prompt)
    segment_ids   [R, T]  which triple a token belongs to, -1 on padding
    branch_ids    [R, T]  0 prompt, 1 chosen, 2 rejected
    segments              (row, start, end) of each triple
"""

import sys
from dataclasses import dataclass

import torch

from .attention import CHOSEN, MASK_TESTED, PROMPT, REJECTED
from .config import Config


LAYOUTS = ("packed", "shared", "padded")


def _score_tensors(index, target, seq, is_completion, features) -> dict:
    """The part of the batch contract every layout shares: what to score, and provenance."""
    return {
        "score_index": torch.tensor(index, dtype=torch.long),
        "score_target": torch.tensor(target, dtype=torch.long),
        "score_seq": torch.tensor(seq, dtype=torch.long),
        "score_is_completion": torch.tensor(is_completion, dtype=torch.bool),
        "source": [f["source"] for f in features],
        "row": [f["row"] for f in features],
    }


@dataclass
class PaddedCollator:
    pad_token_id: int
    score_prompt: bool = False  # also score the chosen prompt (for an NLL over prompt + completion)

    def __call__(self, features: list[dict]) -> dict:
        B = len(features)
        rows = [f["prompt_ids"] + f["chosen_ids"] for f in features]
        rows += [f["prompt_ids"] + f["rejected_ids"] for f in features]
        prompt_lens = [len(f["prompt_ids"]) for f in features] * 2
        T = max(len(r) for r in rows)

        input_ids = torch.full((2 * B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((2 * B, T), dtype=torch.long)
        index, target, seq, is_completion = [], [], [], []
        for r, (ids, P) in enumerate(zip(rows, prompt_lens)):
            L = len(ids)
            input_ids[r, :L] = torch.tensor(ids)
            attention_mask[r, :L] = 1
            # Token t is predicted at position t-1, so the first token (BOS) is never scored.
            first = 1 if self.score_prompt and r < B else max(P, 1)
            index.extend(range(r * T + first - 1, r * T + L - 1))
            target.extend(ids[first:L])
            seq.extend([r] * (L - first))
            is_completion.extend(t >= P for t in range(first, L))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **_score_tensors(index, target, seq, is_completion, features),
        }


def _score(index, target, seq, is_completion, row_start, ids, first, positions, seq_id, P):
    """Append the scored tokens ids[first:] of one branch; `positions[t]` predicts token t."""
    for t in range(first, len(ids)):
        index.append(row_start + positions[t])
        target.append(ids[t])
        seq.append(seq_id)
        is_completion.append(t >= P)


@dataclass
class SharedPrefixCollator:
    """Layouts "shared" (pack=False) and "packed" (pack=True): see the module docstring."""

    pad_token_id: int
    score_prompt: bool = False
    pack: bool = True
    pack_length: int | None = None  # tokens per packed row (at least the longest triple); None: the longest

    def _rows(self, lengths: list[int]) -> list[list[int]]:
        """Which triples go in which row: one each, or first-fit decreasing into pack_length."""
        if not self.pack:
            return [[i] for i in range(len(lengths))]
        capacity = max(self.pack_length or 0, max(lengths))
        rows, free = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
            if slot is None:
                rows.append([i])
                free.append(capacity - lengths[i])
            else:
                rows[slot].append(i)
                free[slot] -= lengths[i]
        return rows

    def __call__(self, features: list[dict]) -> dict:
        B = len(features)
        lengths = [len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features]
        rows = self._rows(lengths)
        T = max(sum(lengths[i] for i in row) for row in rows)
        R = len(rows)
        input_ids = torch.full((R, T), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((R, T), dtype=torch.long)
        segment_ids = torch.full((R, T), -1, dtype=torch.long)
        branch_ids = torch.zeros((R, T), dtype=torch.long)
        index, target, seq, is_completion = [], [], [], []
        segments = []  # (row, start, end) of each triple
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                f = features[i]
                prompt, chosen, rejected = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
                P, C, Rj = len(prompt), len(chosen), len(rejected)
                n = P + C + Rj
                span = slice(offset, offset + n)
                segments.append((r, offset, offset + n))
                input_ids[r, span] = torch.tensor(prompt + chosen + rejected)
                position_ids[r, span] = torch.tensor(list(range(P + C)) + list(range(P, P + Rj)))
                segment_ids[r, span] = i
                branch_ids[r, span] = torch.tensor([PROMPT] * P + [CHOSEN] * C + [REJECTED] * Rj)
                start = r * T + offset
                # Where each token of a branch is predicted from: the previous token of the same
                # branch, or for a completion's first token the prompt's last one.
                chosen_from = [t - 1 for t in range(P + C)]
                rejected_from = [t - 1 for t in range(P)] + [P - 1] + [P + C + k - 1 for k in range(1, Rj)]
                first = 1 if self.score_prompt else max(P, 1)
                _score(index, target, seq, is_completion, start, prompt + chosen, first, chosen_from, i, P)
                _score(index, target, seq, is_completion, start, prompt + rejected, max(P, 1), rejected_from, B + i, P)
                offset += n
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "branch_ids": branch_ids,
            "segments": segments,
            **_score_tensors(index, target, seq, is_completion, features),
        }


def choose_layout(requested: str, config, attn_implementation: str | None, router_aux: bool) -> tuple[str, str | None]:
    """The layout to use and, when it differs from the request, why (one log line)."""
    if requested == "padded":
        return requested, None
    text = config.get_text_config()
    if router_aux:
        why = "the MoE router loss needs a 2-D attention mask"
    elif text.model_type not in MASK_TESTED:
        why = f"architecture {text.model_type} is not tested with prefix-sharing masks"
    elif attn_implementation not in ("sdpa", "eager", "flex_attention"):
        why = f"attention {attn_implementation} cannot take a 4-D mask (use sdpa, eager or flex_attention)"
    else:
        return requested, None
    return "padded", f"layout {requested} -> padded: {why}"


def collator_for(cfg: Config, pad_token_id: int, layout: str = "padded", attn_implementation: str | None = None):
    """The collator for a layout. With SDPA, prefix-shared rows run attention triple by triple
    (`attention.segmented_sdpa`, which the run installs with `attention.install_segmented_sdpa`),
    so packing costs no attention work and a micro-batch packs into one row; with a dense mask
    (eager, flex), rows stop at the longest triple to bound the T² cost."""
    # prompt tokens are scored only for an NLL term that spans the prompt (ORPO)
    score_prompt = cfg.objective.nll_weight > 0 and cfg.method.nll_span == "prompt+completion"
    if layout == "padded":
        return PaddedCollator(pad_token_id=pad_token_id, score_prompt=score_prompt)
    pack_length = cfg.data.pack_length
    if pack_length is None and attn_implementation == "sdpa":
        pack_length = sys.maxsize
    return SharedPrefixCollator(pad_token_id=pad_token_id, score_prompt=score_prompt, pack=layout == "packed",
                                pack_length=pack_length)
