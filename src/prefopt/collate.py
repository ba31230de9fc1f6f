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

"shared" and "packed" replace `attention_mask` with per-token ids from which `attention_bias`
builds the additive 4-D mask in the model's dtype:

    position_ids  [R, T]  position within the triple (rejected restarts after the prompt)
    segment_ids   [R, T]  which triple a token belongs to, -1 on padding
    branch_ids    [R, T]  0 prompt, 1 chosen, 2 rejected
"""

from dataclasses import dataclass

import sys

import torch

from .config import Config


LAYOUTS = ("packed", "shared", "padded")
PROMPT, CHOSEN, REJECTED = 0, 1, 2


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


def _visible(seg, branch, pos, window):
    """[R, T, T] bool: causal, within a triple, rejected never sees chosen, optional window."""
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device)
    visible = (idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
    visible &= ~((branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN))
    if window is not None:
        visible &= (pos[:, :, None] - pos[:, None, :]) < window
    return visible


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def attention_bias(batch: dict, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """The additive [R, 1, T, T] mask for a "shared"/"packed" batch (0 = attend).

    A query attends to earlier tokens of its own triple, except that rejected tokens never see
    chosen ones; with `window`, only to keys whose position is less than `window` behind its own
    (sliding-window attention, measured in positions as the unshared sequence would have them).
    Padding attends to itself so no row is fully masked (eager attention would give NaN).
    Masked entries are the dtype's most negative number, not -inf, for the same reason.
    """
    seg, branch, pos = batch["segment_ids"], batch["branch_ids"], batch["position_ids"]
    T = seg.shape[1]
    visible = _visible(seg, branch, pos, window)
    visible |= torch.eye(T, dtype=torch.bool, device=seg.device)[None] & (seg[:, :, None] < 0)
    return _additive(visible, dtype)


class Segments:
    """The triples of a packed batch, handed through the model's kwargs to `segmented_sdpa`.

    Each layer asks for a triple's mask with its own sliding window; masks are built once per
    (triple, window) and dtype.
    """

    def __init__(self, batch: dict):
        self.spans = batch["segments"]
        self.branch, self.pos = batch["branch_ids"], batch["position_ids"]
        self._masks = {}

    def mask(self, k: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        key = (k, window, dtype)
        if key not in self._masks:
            r, s, e = self.spans[k]
            ones = torch.zeros((1, e - s), dtype=torch.long, device=self.pos.device)
            visible = _visible(ones, self.branch[r : r + 1, s:e], self.pos[r : r + 1, s:e], window)
            self._masks[key] = _additive(visible, dtype)
        return self._masks[key]


_plain_sdpa = None


def segmented_sdpa(module, query, key, value, attention_mask, prefopt_segments: Segments | None = None, **kwargs):
    """transformers' SDPA attention, run triple by triple when a packed batch says where they are.

    Attention inside a packed row is block-diagonal: computing it densely over the whole row
    would spend T² work on a mask that is mostly empty. Per triple it costs Σ n², like
    variable-length flash attention. Without `prefopt_segments` this is plain SDPA.
    """
    if prefopt_segments is None:
        return _plain_sdpa(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.get("sliding_window")
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # [R, T, heads, d]
    for k, (r, s, e) in enumerate(prefopt_segments.spans):
        mask = prefopt_segments.mask(k, window, query.dtype)
        o, _ = _plain_sdpa(module, query[r : r + 1, :, s:e], key[r : r + 1, :, s:e], value[r : r + 1, :, s:e],
                           mask, **kwargs)
        out[r, s:e] = o[0]
    return out, None


def install_segmented_sdpa():
    """Route transformers' "sdpa" attention through `segmented_sdpa` (a no-op for other callers)."""
    global _plain_sdpa
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _plain_sdpa is None:
        _plain_sdpa = sdpa_attention_forward
        AttentionInterface.register("sdpa", segmented_sdpa)


def block_mask(batch: dict, window: int | None = None):
    """The same rule as `attention_bias`, as a FlexAttention BlockMask: sparse, so the blocks a
    query may not see (other triples, the chosen branch from rejected) cost no compute."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, branch, pos = batch["segment_ids"], batch["branch_ids"], batch["position_ids"]
    R, T = seg.shape

    def mask_mod(b, h, q, k):
        visible = (q >= k) & (seg[b, q] == seg[b, k]) & ~((branch[b, q] == REJECTED) & (branch[b, k] == CHOSEN))
        if window is not None:
            visible = visible & (pos[b, q] - pos[b, k] < window)
        return visible | ((q == k) & (seg[b, q] < 0))

    return create_block_mask(mask_mod, B=R, H=None, Q_LEN=T, KV_LEN=T, device=seg.device)


# Architectures whose forward is tested to give the padded layout's log-probs with the 4-D mask
# (tests/test_layouts.py). Anything else trains with the padded layout.
MASK_TESTED = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma2"})


def model_inputs(batch: dict, config, dtype: torch.dtype) -> dict:
    """The forward's mask and position kwargs for any layout."""
    if "segment_ids" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    if config._attn_implementation == "sdpa" and _plain_sdpa is not None and "segments" in batch:
        # each layer's attention builds its own per-triple masks; the model gets a 1-element
        # placeholder so that no [T, T] mask is built anywhere
        placeholder = torch.zeros((batch["input_ids"].shape[0], 1, 1, 1), dtype=dtype, device=batch["input_ids"].device)
        mask = {kind: placeholder for kind in set(layer_types)} if layer_types else placeholder
        return {"attention_mask": mask, "position_ids": batch["position_ids"], "prefopt_segments": Segments(batch)}
    if config._attn_implementation == "flex_attention":
        build = lambda window: block_mask(batch, window)  # noqa: E731
    else:
        build = lambda window: attention_bias(batch, dtype, window)  # noqa: E731
    if layer_types:
        # models with per-layer attention types take one mask per type
        mask = {kind: build(text.sliding_window if kind == "sliding_attention" else None) for kind in set(layer_types)}
    else:
        mask = build(getattr(text, "sliding_window", None))
    return {"attention_mask": mask, "position_ids": batch["position_ids"]}


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
    (`segmented_sdpa`), so packing costs no attention work and a micro-batch packs into one row;
    with a dense mask (eager, flex), rows stop at the longest triple to bound the T² cost."""
    # prompt tokens are scored only for an NLL term that spans the prompt (ORPO)
    score_prompt = cfg.objective.nll_weight > 0 and cfg.method.nll_span == "prompt+completion"
    if layout == "padded":
        return PaddedCollator(pad_token_id=pad_token_id, score_prompt=score_prompt)
    segmented = attn_implementation == "sdpa"
    if segmented:
        install_segmented_sdpa()
    pack_length = cfg.data.pack_length
    if pack_length is None and segmented:
        pack_length = sys.maxsize
    return SharedPrefixCollator(pad_token_id=pad_token_id, score_prompt=score_prompt, pack=layout == "packed",
                                pack_length=pack_length)
