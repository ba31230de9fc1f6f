"""Prefix-shared and packed layouts: explicit expected tensors, then parity with the padded
reference — per-sequence log-probs, loss and gradients — on every tested architecture."""

import copy

import pytest
import torch

from helpers import make_trainer, random_pairs
from prefopt.attention import attention_bias, install_segmented_sdpa, model_inputs
from prefopt.collate import PaddedCollator, SharedPrefixCollator, choose_layout
from prefopt.logprobs import per_sequence, token_logps
from prefopt.tiny import tiny_model

# prompt [1, 5, 6], chosen [7, 2], rejected [8, 9, 2]
PAIR = dict(prompt_ids=[1, 5, 6], chosen_ids=[7, 2], rejected_ids=[8, 9, 2], source="s", row=0)


def test_shared_row_by_hand():
    b = SharedPrefixCollator(pad_token_id=0, pack=False)([PAIR])
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # rejected restarts after the prompt
    assert b["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert b["segment_ids"].tolist() == [[0] * 8]
    # chosen 7 is predicted at 2 (the prompt's end), 2 at 3; rejected 8 also at 2 (not at 4, the
    # end of chosen), 9 at 5, 2 at 6
    assert b["score_index"].tolist() == [2, 3, 2, 5, 6]
    assert b["score_target"].tolist() == [7, 2, 8, 9, 2]
    assert b["score_seq"].tolist() == [0, 0, 1, 1, 1]
    assert b["score_is_completion"].all()


def test_shared_mask_by_hand():
    b = SharedPrefixCollator(pad_token_id=0, pack=False)([PAIR])
    visible = (attention_bias(b, torch.float32)[0, 0] == 0).int().tolist()
    assert visible == [
        # keys: p p p c c r r r
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen sees prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected sees prompt and itself, never chosen
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    # a window of 2 positions: rejected 9 (position 4) sees position 3 (8) and itself only
    windowed = (attention_bias(b, torch.float32, window=2)[0, 0] == 0).int().tolist()
    assert windowed[6] == [0, 0, 0, 0, 0, 1, 1, 0]


def test_packed_rows_are_block_diagonal_and_pad_only_the_tail():
    small = dict(prompt_ids=[1, 3], chosen_ids=[2], rejected_ids=[4, 2], source="s", row=1)
    b = SharedPrefixCollator(pad_token_id=0, pack=True, pack_length=16)([PAIR, small])
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2, 1, 3, 2, 4, 2]]  # one row, no padding
    assert b["segment_ids"].tolist() == [[0] * 8 + [1] * 5]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 2, 3]]
    visible = attention_bias(b, torch.float32)[0, 0] == 0
    assert not visible[8:, :8].any() and not visible[:8, 8:].any()  # triples never see each other
    # the second triple's scores point into its own block: chosen 2 at 9, rejected 4 at 9, 2 at 11
    assert b["score_index"].tolist()[5:] == [9, 9, 11]
    assert b["score_seq"].tolist() == [0, 0, 2, 2, 2, 1, 3, 3]
    # a capacity too small for both: two rows, the second padded at its tail with segment -1
    two = SharedPrefixCollator(pad_token_id=0, pack=True, pack_length=8)([PAIR, small])
    assert two["input_ids"].shape == (2, 8) and two["segment_ids"][1].tolist() == [1] * 5 + [-1] * 3


def scored(model, batch, orpo=False):
    out = model(input_ids=batch["input_ids"], **model_inputs(batch, model.config, model.dtype),
                output_hidden_states=True, logits_to_keep=1)
    tok = token_logps(out.hidden_states[-1], batch["score_index"], batch["score_target"],
                      model.get_output_embeddings(), None, 64)
    return per_sequence(tok.logps, batch["score_seq"], torch.ones_like(batch["score_is_completion"]), 12)[0]


ARCH_ATTN = [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa"), ("qwen2", "eager"),
             ("phi3", "sdpa"), ("gemma2", "eager")]


@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_sequence_logps_equal_padded(arch, attn):
    """Both SDPA paths: triple by triple (`segmented_sdpa`, installed as a run installs it) and,
    for a batch without `segments`, the dense mask."""
    install_segmented_sdpa()
    # prompts and completions longer than the tiny models' sliding window of 8 (mistral, gemma2)
    pairs = random_pairs(6, seed=4, max_prompt=14, max_completion=14)
    model = tiny_model(arch, 101, attn_implementation=attn)
    reference = scored(model, PaddedCollator(0, score_prompt=True)(pairs))
    for collator in (SharedPrefixCollator(0, True, pack=False), SharedPrefixCollator(0, True, pack=True, pack_length=64)):
        batch = collator(pairs)
        dense = {k: v for k, v in batch.items() if k != "segments"}
        assert ("prefopt_segments" in model_inputs(batch, model.config, model.dtype)) == (attn == "sdpa")
        assert "prefopt_segments" not in model_inputs(dense, model.config, model.dtype)
        for b in (batch, dense):
            torch.testing.assert_close(scored(model, b), reference, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
@pytest.mark.parametrize("method", ["cpo_simpo", "orpo"])
def test_loss_and_gradients_equal_padded(arch, attn, method, tmp_path):
    install_segmented_sdpa()  # as the run does: with sdpa, shared and packed run triple by triple
    pairs = random_pairs(5, seed=8, max_prompt=12, max_completion=12)
    base = tiny_model(arch, 101, attn_implementation=attn)
    results = {}
    for layout in ("padded", "shared", "packed"):
        model = copy.deepcopy(base)
        trainer = make_trainer(model, {"method": method}, tmp_path / layout, layout=layout)
        loss = trainer.compute_loss(model, trainer.data_collator(pairs))
        loss.backward()
        results[layout] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    ref_loss, ref_grads = results["padded"]
    for layout in ("shared", "packed"):
        loss, grads = results[layout]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{layout} {name}")


def test_positions_computed_equal_the_unique_token_lower_bound():
    pairs = random_pairs(8, seed=1, max_prompt=30, max_completion=20)
    unique = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    padded = PaddedCollator(0)(pairs)["input_ids"].numel()
    packed = SharedPrefixCollator(0, pack=True, pack_length=unique)(pairs)["input_ids"].numel()
    assert packed == unique  # one row holding everything: not one wasted position
    assert padded > 1.5 * unique  # the reference recomputes the prompt and pads


def test_fallback_to_padded_says_why(caplog):
    moe = tiny_model("mixtral", 101)
    assert choose_layout("packed", moe.config, "sdpa", router_aux=True) == (
        "padded", "layout packed -> padded: the MoE router loss needs a 2-D attention mask")
    llama = tiny_model("llama", 101)
    assert choose_layout("packed", llama.config, "flash_attention_2", router_aux=False)[1].endswith(
        "attention flash_attention_2 cannot take a 4-D mask (use sdpa, eager or flex_attention)")
    assert choose_layout("shared", llama.config, "sdpa", router_aux=False) == ("shared", None)
    qmoe = tiny_model("qwen2_moe", 101)
    assert "not tested with prefix-sharing masks" in choose_layout("packed", qmoe.config, "sdpa", False)[1]


def test_sdpa_packs_a_micro_batch_into_one_row_at_the_lower_bound(tmp_path):
    from prefopt.config import build_config
    from prefopt.collate import collator_for

    pairs = random_pairs(6, seed=2, max_prompt=20, max_completion=20)
    unique = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    cfg = build_config({"method": "simpo", "output_dir": str(tmp_path)})
    sdpa = collator_for(cfg, 0, "packed", "sdpa")(pairs)
    assert sdpa["input_ids"].shape == (1, unique)  # every position is a unique token
    eager = collator_for(cfg, 0, "packed", "eager")(pairs)  # dense mask: rows stop at the longest triple
    longest = max(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    assert eager["input_ids"].shape[1] == longest and eager["input_ids"].shape[0] > 1


def test_segmented_sdpa_is_plain_sdpa_for_everyone_else(monkeypatch):
    """Installing it changes nothing for a model called without segments (generation, eval)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prefopt.attention import segmented_sdpa

    model = tiny_model("qwen2", 101)
    ids = torch.randint(3, 100, (2, 9))
    with monkeypatch.context() as plain:  # whatever earlier tests installed: transformers' own SDPA
        plain.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
        before = model(input_ids=ids).logits
    install_segmented_sdpa()
    assert AttentionInterface._global_mapping["sdpa"] is segmented_sdpa  # not vacuous: it is the one called
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 12)
