"""The visibility rule, written once in prefopt.attention, agrees in all three of its forms:
the dense additive mask, the per-triple masks of `segmented_sdpa` and FlexAttention's mask_mod.
And the SDPA override is installed only when asked."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_pairs
from prefopt.attention import Segments, attention_bias, block_mask, mask_mod
from prefopt.collate import SharedPrefixCollator


@pytest.fixture(scope="module")
def batch():
    # several rows, triples of uneven lengths, padding at the rows' tails
    b = SharedPrefixCollator(0, pack=True, pack_length=40)(random_pairs(7, seed=5, max_prompt=10, max_completion=8))
    assert b["input_ids"].shape[0] > 1 and (b["segment_ids"] < 0).any()
    return b


def flex_grid(mod, R: int, T: int) -> torch.Tensor:
    """[R, T, T] bool: a mask_mod evaluated on every (row, query, key) at once."""
    r, i = torch.arange(R), torch.arange(T)
    return mod(r[:, None, None], torch.zeros((), dtype=torch.long), i[None, :, None], i[None, None, :])


@pytest.mark.parametrize("window", [None, 1, 2, 3, 5])
def test_dense_flex_and_per_triple_masks_agree(batch, window):
    R, T = batch["segment_ids"].shape
    dense = attention_bias(batch, torch.float32, window)[:, 0] == 0
    assert torch.equal(flex_grid(mask_mod(batch, window), R, T), dense)

    segments = Segments(batch)
    from_triples = torch.zeros((R, T, T), dtype=torch.bool)
    for k, (r, s, e) in enumerate(segments.spans):
        from_triples[r, s:e, s:e] = segments.mask(k, window, torch.float32)[0, 0] == 0
    pad = batch["segment_ids"] < 0
    assert torch.equal(dense[~pad], from_triples[~pad])  # a real token sees exactly its triple's mask
    assert not (dense & pad[:, :, None] & ~pad[:, None, :]).any()  # padding never sees a real token
    assert dense.diagonal(dim1=1, dim2=2).all()  # every query sees itself: no fully masked row
    if window is not None:  # not vacuous: the window removes something
        assert (attention_bias(batch, torch.float32)[:, 0] == 0).sum() > dense.sum()


@pytest.mark.parametrize("window", [None, 3])
def test_segmented_sdpa_equals_sdpa_over_the_dense_mask(batch, window):
    """Triple by triple (without a window: prompt + chosen as one causal call, the rejected
    queries over the prompt's keys and their own) gives what one SDPA call over each whole row with
    the dense mask gives, at every non-padding position, grouped-query heads included. The same
    products and sums, split differently: fp32 round-off of a softmax over ≤ 40 keys."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prefopt import attention

    attention.install_segmented_sdpa()
    R, T = batch["segment_ids"].shape
    torch.manual_seed(0)
    q, k, v = torch.randn(R, 4, T, 8), torch.randn(R, 2, T, 8), torch.randn(R, 2, T, 8)
    module = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=2)
    kw = {"scaling": 8**-0.5, "dropout": 0.0, "sliding_window": window}
    ours, _ = attention.segmented_sdpa(module, q, k, v, None, prefopt_segments=Segments(batch), **kw)
    dense, _ = sdpa_attention_forward(module, q, k, v, attention_bias(batch, torch.float32, window), **kw)
    real = batch["segment_ids"] >= 0
    torch.testing.assert_close(ours[real], dense[real], rtol=1e-5, atol=1e-6)


def test_block_mask_carries_the_rule(batch):
    R, T = batch["segment_ids"].shape
    flex = block_mask(batch, 3)
    assert torch.equal(flex_grid(flex.mask_mod, R, T), attention_bias(batch, torch.float32, 3)[:, 0] == 0)


def test_segmented_sdpa_installed_only_when_asked(tmp_path):
    """Neither importing prefopt nor building an SDPA collator touches transformers' "sdpa"; the
    explicit install does, once. In a fresh process: this one's tests install it."""
    script = """
import sys
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
import prefopt.attention as attention, prefopt.collate, prefopt.trainer
from prefopt.config import build_config
from helpers import random_pairs

cfg = build_config({"method": "simpo", "output_dir": sys.argv[1]})
batch = prefopt.collate.collator_for(cfg, 0, "packed", "sdpa")(random_pairs(3))
assert "segments" in batch
assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
assert not attention.segmented_sdpa_installed()
assert attention.install_segmented_sdpa() is True
assert attention.install_segmented_sdpa() is False
assert AttentionInterface._global_mapping["sdpa"] is attention.segmented_sdpa
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
