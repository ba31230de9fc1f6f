"""The log-prob helper: both implementations (fused, checkpointed module) equal a plain
full-logits reference in values and in gradients for the hidden states, the weight and the bias."""

import pytest
import torch

from prefopt.logprobs import per_sequence, token_logps


def reference(h, target, weight, bias, transform=None):
    z = torch.nn.functional.linear(h, weight, bias).float()
    if transform is not None:
        z = transform(z)
    return torch.log_softmax(z, -1).gather(1, target[:, None]).squeeze(1), z.mean(-1)


# fused with every row's softmax recomputed in backward, with 10 of the 29 rows' kept (a part that
# is not a whole number of chunks), with all kept; the checkpointed module
@pytest.mark.parametrize("fused, keep", [(True, 0), (True, 10), (True, 29), (False, 0)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_values_and_gradients_equal_the_full_logits_reference(fused, keep, with_bias, chunk):
    torch.manual_seed(0)
    V, H, N = 53, 16, 29
    head = torch.nn.Linear(H, V, bias=with_bias)
    hidden = torch.randn(3, 20, H, requires_grad=True)
    index = torch.randperm(60)[:N]
    target = torch.randint(0, V, (N,))
    upstream = torch.randn(N)  # an arbitrary incoming gradient, not just ones

    tok = token_logps(hidden, index, target, head, chunk=chunk, fused=fused, keep=keep)
    (tok.logps * upstream).sum().backward()
    ours = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone() if with_bias else None)
    hidden.grad = None
    head.zero_grad()

    ref, ref_mean = reference(hidden.reshape(-1, H)[index], target, head.weight, head.bias)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(tok.logps, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.mean_logits, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], head.weight.grad, rtol=1e-5, atol=1e-6)
    if with_bias:
        torch.testing.assert_close(ours[2], head.bias.grad, rtol=1e-5, atol=1e-6)


def test_softcapped_heads_take_the_module_path_and_match():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 31, bias=False)
    cap = lambda z: torch.tanh(z / 3.0) * 3.0  # noqa: E731
    h = torch.randn(12, 8, requires_grad=True)
    target = torch.randint(0, 31, (12,))
    tok = token_logps(h[None], torch.arange(12), target, head, transform=cap, chunk=5)
    ref, _ = reference(h, target, head.weight, None, cap)
    torch.testing.assert_close(tok.logps, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(tok.logps.sum(), h)[0]
    g_ref = torch.autograd.grad(ref.sum(), h)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_per_sequence_sums_and_counts():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    seq = torch.tensor([0, 0, 1, 2, 2])
    mask = torch.tensor([True, True, False, True, False])
    sums, counts = per_sequence(values, seq, mask, 4)
    assert sums.tolist() == [3.0, 0.0, 4.0, 0.0] and counts.tolist() == [2.0, 0.0, 1.0, 0.0]
