"""Attention over prefix-shared and packed rows: one visibility rule, three materialisations.

A "shared"/"packed" batch (collate.py) carries, per token,

    position_ids  [R, T]  position within the triple (rejected restarts after the prompt)
    segment_ids   [R, T]  which triple a token belongs to, -1 on padding
    branch_ids    [R, T]  PROMPT 0, CHOSEN 1, REJECTED 2
    segments      list    (row, start, end) of each triple

and `visible` says which keys a query may attend to. It is written once, on tensors that
broadcast, and materialised as

- `attention_bias`: the dense additive [R, 1, T, T] mask (eager, or SDPA without the override);
- `block_mask`: a FlexAttention BlockMask, whose `mask_mod` calls `visible` pointwise;
- `Segments.mask`: one small mask per triple, for `segmented_sdpa`.

`segmented_sdpa` runs SDPA triple by triple (Σ n² work instead of T²; without a sliding window,
prompt + chosen as one causal call and the rejected queries as another). It is installed by
`install_segmented_sdpa()`, which the run calls explicitly (never on import, never by building
a collator): it registers the function under transformers' own "sdpa" name through
`AttentionInterface.register`, a process-wide table, so no model config changes and a saved
model loads anywhere. Every call that does not pass `prefopt_segments` (generation, other
models) goes to the original SDPA unchanged. Until it is installed, `model_inputs` gives SDPA the
dense mask: the same numbers at T² cost.
"""

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2

# Architectures whose forward is tested to give the padded layout's log-probs with the 4-D mask
# (tests/test_layouts.py). Anything else trains with the padded layout.
MASK_TESTED = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma2"})


def visible(seg_q, seg_k, branch_q, branch_k, pos_q, pos_k, q_idx, k_idx, window: int | None):
    """Whether query q may attend to key k, for any broadcastable shapes (bool).

    Causal (by index in the row), within one triple, and the rejected branch never sees the
    chosen one; with `window`, only keys less than `window` positions behind (sliding-window
    attention in position space, as the unshared sequence would have it). Padding (segment -1)
    sees the padding before it and always itself, so no query row is fully masked (eager
    attention would give NaN).
    """
    allowed = (q_idx >= k_idx) & (seg_q == seg_k) & ~((branch_q == REJECTED) & (branch_k == CHOSEN))
    if window is not None:
        allowed = allowed & (pos_q - pos_k < window)
    return allowed | ((q_idx == k_idx) & (seg_q < 0))


def _dense_visible(seg, branch, pos, window: int | None) -> torch.Tensor:
    """[R, T, T] bool: `visible` for every (query, key) of each row."""
    idx = torch.arange(seg.shape[1], device=seg.device)
    return visible(seg[:, :, None], seg[:, None, :], branch[:, :, None], branch[:, None, :],
                   pos[:, :, None], pos[:, None, :], idx[None, :, None], idx[None, None, :], window)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, T, T] bool → [R, 1, T, T] additive mask: 0 where allowed, the dtype's most negative
    number elsewhere (not -inf, which turns a fully masked row into NaN)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def attention_bias(batch: dict, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """The additive [R, 1, T, T] mask for a "shared"/"packed" batch (0 = attend): see `visible`."""
    allowed = _dense_visible(batch["segment_ids"], batch["branch_ids"], batch["position_ids"], window)
    return _additive(allowed, dtype)


def mask_mod(batch: dict, window: int | None = None):
    """`visible` as FlexAttention's mask_mod(b, h, q, k) over a batch's rows."""
    seg, branch, pos = batch["segment_ids"], batch["branch_ids"], batch["position_ids"]

    def mod(b, h, q, k):
        return visible(seg[b, q], seg[b, k], branch[b, q], branch[b, k], pos[b, q], pos[b, k], q, k, window)

    return mod


def block_mask(batch: dict, window: int | None = None):
    """`visible` as a FlexAttention BlockMask: sparse, so the blocks a query may not see (other
    triples, the chosen branch from rejected) cost no compute."""
    from torch.nn.attention.flex_attention import create_block_mask

    R, T = batch["segment_ids"].shape
    return create_block_mask(mask_mod(batch, window), B=R, H=None, Q_LEN=T, KV_LEN=T,
                             device=batch["segment_ids"].device)


class Segments:
    """The triples of a packed batch, handed through the model's kwargs to `segmented_sdpa`.

    Each layer asks for a triple's mask with its own sliding window; masks are built once per
    (triple, window) and dtype.
    """

    def __init__(self, batch: dict):
        self.spans = batch["segments"]
        self.branch, self.pos = batch["branch_ids"], batch["position_ids"]
        self._masks = {}
        # each triple's prompt length and where its rejected branch starts: [prompt][chosen][rejected]
        self.prompt_and_split = []
        for r, s, e in self.spans:
            b = self.branch[r, s:e]
            self.prompt_and_split.append((int((b == PROMPT).sum()), s + int((b != REJECTED).sum())))

    def mask(self, k: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, n, n] additive mask of triple k (n = its tokens)."""
        key = (k, window, dtype)
        if key not in self._masks:
            r, s, e = self.spans[k]
            one_triple = torch.zeros((1, e - s), dtype=torch.long, device=self.pos.device)
            allowed = _dense_visible(one_triple, self.branch[r : r + 1, s:e], self.pos[r : r + 1, s:e], window)
            self._masks[key] = _additive(allowed, dtype)
        return self._masks[key]

    def rejected_mask(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, n_r, P + n_r] additive mask of triple k's rejected queries over its prompt's keys
        and its own: every prompt key, and causal within the branch."""
        key = (k, "rejected", dtype)
        if key not in self._masks:
            r, s, e = self.spans[k]
            P, split = self.prompt_and_split[k]
            q = torch.arange(e - split, device=self.pos.device)
            kk = torch.arange(P + e - split, device=self.pos.device)
            allowed = (kk[None, :] < P) | (kk[None, :] - P <= q[:, None])
            self._masks[key] = _additive(allowed[None], dtype)
        return self._masks[key]


_plain_sdpa = None  # transformers' own SDPA, once `install_segmented_sdpa` has replaced it


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
        if window is None:
            _triple_in_two(module, query[r : r + 1], key[r : r + 1], value[r : r + 1], out[r : r + 1],
                           prefopt_segments, k, kwargs)
            continue
        mask = prefopt_segments.mask(k, window, query.dtype)
        o, _ = _plain_sdpa(module, query[r : r + 1, :, s:e], key[r : r + 1, :, s:e], value[r : r + 1, :, s:e],
                           mask, **kwargs)
        out[r, s:e] = o[0]
    return out, None


def _triple_in_two(module, query, key, value, out, segments: Segments, k: int, kwargs: dict):
    """One triple as two SDPA calls instead of one masked n × n: prompt + chosen is a plain causal
    sequence (no mask: the kernel skips the blocks above the diagonal), and the rejected queries
    attend to the prompt's keys and their own (half of the n² entries were masked off before)."""
    r, s, e = segments.spans[k]
    P, split = segments.prompt_and_split[k]
    o, _ = _plain_sdpa(module, query[:, :, s:split], key[:, :, s:split], value[:, :, s:split], None, **kwargs)
    out[:, s:split] = o
    if split < e:
        keys = torch.cat([key[:, :, s : s + P], key[:, :, split:e]], dim=2)
        values = torch.cat([value[:, :, s : s + P], value[:, :, split:e]], dim=2)
        o, _ = _plain_sdpa(module, query[:, :, split:e], keys, values, segments.rejected_mask(k, query.dtype), **kwargs)
        out[:, split:e] = o


def install_segmented_sdpa() -> bool:
    """Route transformers' "sdpa" attention through `segmented_sdpa` for the whole process.

    Idempotent: True when this call installed it, False when it already was. Calls without
    `prefopt_segments` are unchanged, so installing it is safe for any other model use.
    """
    global _plain_sdpa
    if _plain_sdpa is not None:
        return False
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _plain_sdpa = sdpa_attention_forward
    AttentionInterface.register("sdpa", segmented_sdpa)
    return True


def segmented_sdpa_installed() -> bool:
    """Whether `install_segmented_sdpa` has run in this process."""
    return _plain_sdpa is not None


def _dense_mask(batch: dict, config, dtype: torch.dtype, window: int | None):
    if config._attn_implementation == "flex_attention":
        return block_mask(batch, window)
    return attention_bias(batch, dtype, window)


def model_inputs(batch: dict, config, dtype: torch.dtype) -> dict:
    """The forward's mask and position kwargs for any layout."""
    if "segment_ids" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    if config._attn_implementation == "sdpa" and segmented_sdpa_installed() and "segments" in batch:
        # each layer's attention builds its own per-triple masks; the model gets a 1-element
        # placeholder so that no [T, T] mask is built anywhere
        placeholder = torch.zeros((batch["input_ids"].shape[0], 1, 1, 1), dtype=dtype, device=batch["input_ids"].device)
        mask = {kind: placeholder for kind in set(layer_types)} if layer_types else placeholder
        return {"attention_mask": mask, "position_ids": batch["position_ids"], "prefopt_segments": Segments(batch)}
    if layer_types:
        # models with per-layer attention types take one mask per type, the sliding layers' windowed
        mask = {kind: _dense_mask(batch, config, dtype, text.sliding_window if kind == "sliding_attention" else None)
                for kind in set(layer_types)}
    else:
        mask = _dense_mask(batch, config, dtype, getattr(text, "sliding_window", None))
    return {"attention_mask": mask, "position_ids": batch["position_ids"]}
