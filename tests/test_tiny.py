"""Tiny offline tokenizers/models (prefopt.tiny) and the demo's synthetic task (prefopt.demo)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.demo import is_correct, make_rows, task_corpus
from prefopt.tiny import (
    ARCHS,
    SLIDING_WINDOW,
    default_corpus,
    save_tiny,
    tiny_config,
    tiny_model,
    train_tokenizer,
)

MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus())


# --- tokenizer ---------------------------------------------------------------------------------


def test_special_tokens_and_ids(tok):
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<s>", "<pad>")
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert tok("<|im_start|>user<|im_end|>").input_ids[0] == 3
    assert len(tok) == 512


def test_no_automatic_bos_or_eos(tok):
    ids = tok("The cat sees the moon.").input_ids
    assert ids == tok("The cat sees the moon.", add_special_tokens=False).input_ids
    assert not set(ids) & set(tok.all_special_ids)


def test_bpe_merges_are_real(tok):
    text = "The teacher reads an old book."
    ids = tok(text).input_ids
    assert len(ids) < len(text.encode()) // 2
    assert tok.decode(ids) == text
    # Byte-level: text never seen in training still round-trips.
    assert tok.decode(tok("Zürich, 42 ✓").input_ids) == "Zürich, 42 ✓"


def test_training_is_deterministic(tok):
    assert train_tokenizer(default_corpus()).get_vocab() == tok.get_vocab()
    assert default_corpus() == default_corpus()
    assert len(default_corpus()) >= 300


def test_chatml_template(tok):
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bos_in_template():
    tok = train_tokenizer(default_corpus(), add_bos_in_template=True)
    rendered = tok.apply_chat_template(MESSAGES[:1], tokenize=False)
    assert rendered == "<s><|im_start|>user\nHi there<|im_end|>\n"
    assert tok(rendered).input_ids[:2] == [tok.bos_token_id, 3]
    with pytest.raises(ValueError, match="bos=True"):
        train_tokenizer(default_corpus(), bos=False, add_bos_in_template=True)


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<s>A dog helps<|im_end|> the farmer 123<|endoftext|>"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.all_special_tokens == tok.all_special_tokens
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (0, 1, 2)
    render = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == render


def test_without_bos_or_template():
    tok = train_tokenizer(default_corpus(), bos=False, chat_template=None)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.chat_template is None
    assert "<s>" not in tok.get_vocab()
    assert len(tok("<|im_start|>").input_ids) > 1  # not a special token here
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)


@pytest.mark.parametrize(
    "pad, pad_token",
    [("own", "<pad>"), ("eos", "<|endoftext|>"), (None, None)],
)
def test_pad_modes(pad, pad_token):
    tok = train_tokenizer(default_corpus(), pad=pad)
    assert tok.pad_token == pad_token
    assert (tok.pad_token_id == tok.eos_token_id) == (pad == "eos")
    assert ("<pad>" in tok.get_vocab()) == (pad == "own")


def test_extra_special_tokens():
    tok = train_tokenizer(default_corpus(), extra_special_tokens=["<tool>"])
    assert "<tool>" in tok.all_special_tokens
    assert tok("<tool>").input_ids == [tok.convert_tokens_to_ids("<tool>")]
    assert tok.decode(tok("a <tool> b").input_ids, skip_special_tokens=True) == "a  b"


def test_bad_options():
    with pytest.raises(ValueError, match="pad"):
        train_tokenizer(default_corpus(), pad="unk")
    with pytest.raises(ValueError, match="chatml"):
        train_tokenizer(default_corpus(), chat_template="llama3")


# --- models ------------------------------------------------------------------------------------


def test_unknown_arch_names_supported_ones():
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        tiny_config("gpt2", 512)


def test_config_overrides_apply_last():
    config = tiny_config("gemma2", 100, sliding_window=4, num_hidden_layers=3)
    assert (config.vocab_size, config.sliding_window, config.num_hidden_layers) == (100, 4, 3)
    assert len(config.layer_types) == 3  # derived fields follow the overrides
    assert config.final_logit_softcapping and config.attn_logit_softcapping
    assert tiny_config("mixtral", 100).num_local_experts == 4
    assert tiny_config("llama", 100).tie_word_embeddings is False


def _batch(tok, length=12):
    """Two rows, the second right-padded, longer than the sliding window."""
    ids = torch.randint(5, len(tok), (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, length - 3 :] = 0
    ids[1, length - 3 :] = tok.pad_token_id
    return ids, mask


def _additive_mask(mask2d, dtype, window=None):
    """[B, 1, T, T] float mask: 0 where attended, the dtype's min where masked."""
    pos = torch.arange(mask2d.shape[1])
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    allowed = allowed[None, None] & mask2d.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_forward(arch, impl, tok):
    if arch == "gemma2" and impl == "sdpa":
        with pytest.raises(ValueError, match="eager"):
            tiny_model(arch, tok, attn_implementation=impl)
        return
    model = tiny_model(arch, tok, attn_implementation=impl).eval()
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (2, 1, 0)
    ids, mask = _batch(tok)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        last = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.logits.shape == (2, 1, len(tok))
    assert len(out.hidden_states) == 3
    assert torch.equal(out.hidden_states[-1], last)  # after the final norm
    if arch in ("mixtral", "qwen2_moe"):
        assert out.aux_loss is not None  # output_router_logits is on by default


@pytest.mark.parametrize("arch", ARCHS)
def test_custom_4d_mask_matches_2d_mask(arch, tok):
    """Pins how each arch takes a [B,1,T,T] additive mask: it is used as given for every layer,
    so sliding windows must be baked in; gemma2 (mixed layer types) needs one mask per layer type;
    MoE load balancing only handles 2-D masks, so router logits must be off."""
    model = tiny_model(arch, tok, attn_implementation="eager").eval()
    ids, mask = _batch(tok)
    window = SLIDING_WINDOW if arch in ("mistral", "gemma2") else None
    mask4d = _additive_mask(mask, torch.float32, window)
    if arch == "gemma2":
        mask4d = {"full_attention": _additive_mask(mask, torch.float32), "sliding_attention": mask4d}
    kwargs = {"output_router_logits": False} if arch in ("mixtral", "qwen2_moe") else {}
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        got = model(input_ids=ids, attention_mask=mask4d, **kwargs).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real])


def test_tiny_model_is_deterministic_by_seed():
    a, b, c = (tiny_model("qwen2_moe", 300, seed=s).state_dict() for s in (3, 3, 4))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dtype():
    model = tiny_model("llama", 300, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_save_tiny_round_trip(tok, tmp_path):
    model = tiny_model("mistral", tok).eval()
    path = save_tiny(model, tok, tmp_path / "tiny")
    assert (path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path)
    ids, mask = _batch(loaded_tok)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    assert (loaded.config.pad_token_id, loaded.config.eos_token_id, loaded.config.sliding_window) == (2, 0, 8)


# --- demo task ---------------------------------------------------------------------------------


def test_make_rows_is_deterministic():
    assert make_rows(50, seed=1) == make_rows(50, seed=1)
    assert make_rows(50, seed=1) != make_rows(50, seed=2)
    assert make_rows(50, seed=1, chat=True) == make_rows(50, seed=1, chat=True)
    assert task_corpus() == task_corpus()


def test_chosen_follows_the_rule_and_rejected_breaks_it():
    rows = make_rows(1000, seed=0)
    for row in rows:
        assert is_correct(row["prompt"], row["chosen"])
        assert not is_correct(row["prompt"], row["rejected"])
        assert row["prompt"].endswith(" =") and row["chosen"].startswith(" ")
    # Length must not give the answer away: most pairs are equally long.
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows) / len(rows)
    assert 0.05 < longer < 0.25 and 0.05 < shorter < 0.25


def test_chat_rows_are_the_same_examples():
    plain, chat = make_rows(200, seed=5), make_rows(200, seed=5, chat=True)
    for p, c in zip(plain, chat):
        roles = [m["role"] for m in c["prompt"] + c["chosen"] + c["rejected"]]
        assert roles == ["user", "assistant", "assistant"]
        assert c["prompt"][0]["content"] + " =" == p["prompt"]
        assert c["chosen"][0]["content"] == p["chosen"].strip()
        assert c["rejected"][0]["content"] == p["rejected"].strip()
        assert is_correct(c["prompt"][0]["content"], c["chosen"][0]["content"])
        assert not is_correct(c["prompt"][0]["content"], c["rejected"][0]["content"])


def test_is_correct():
    assert is_correct("Sort: 3 1 2 =", " 1 2 3")
    assert is_correct("Sort: 3 1 2", "1 2 3\n")
    assert not is_correct("Sort: 3 1 2 =", " 1 2 3 3")
    assert not is_correct("Sort: 3 1 2 =", " 1 3 2")
    assert not is_correct("Sort: 3 1 2 =", "")
    with pytest.raises(ValueError, match="Sort:"):
        is_correct("Reverse: 1 2", "2 1")


def test_demo_tokenizer_keeps_digits_whole():
    tok = train_tokenizer(task_corpus(), vocab_size=512)
    row = make_rows(1, seed=0)[0]
    pieces = tok.convert_ids_to_tokens(tok(row["prompt"] + row["chosen"]).input_ids)
    assert pieces[:2] == ["Sort", ":"]
    assert all(p in {f"Ġ{d}" for d in range(10)} for p in pieces[2:] if p != "Ġ=")
