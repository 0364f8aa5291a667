"""sid_logprob: values and gradients against torch autograd on the reference, fresh inputs."""
import pytest
import torch

from gream_fast import GreamError
from gream_fast.kernels.sid_logprob import sid_logprob, sid_logprob_reference


def inputs(n, k, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(dtype)
    head = torch.randn(3 * k, h, generator=g).to(dtype)  # three levels; the middle one is used
    tokens = torch.randint(0, k, (n,), generator=g)
    return hidden, head, tokens


def run(fn, hidden, head, tokens, k, seed):
    h = hidden.clone().requires_grad_()
    w = head.clone().requires_grad_()
    logp = fn(h, w[k:2 * k], tokens)
    g = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed + 1)).to(logp.device)
    (logp * g).sum().backward()
    return logp, h.grad, w.grad


@pytest.mark.parametrize("n,k,h", [(37, 256, 64), (5, 20, 48), (1, 300, 16)])
def test_matches_autograd_fp32(n, k, h):
    hidden, head, tokens = inputs(n, k, h, torch.float32, seed=n)
    ours = run(sid_logprob, hidden, head, tokens, k, n)
    ref = run(sid_logprob_reference, hidden, head, tokens, k, n)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[2][:k].abs().sum() == 0 and ours[2][2 * k:].abs().sum() == 0  # other levels
    # the values are log-probs over the slice
    z = hidden @ head[k:2 * k].T
    torch.testing.assert_close(ours[0].exp(), torch.softmax(z, -1)[torch.arange(n), tokens])


def test_bf16_inputs():
    hidden, head, tokens = inputs(40, 64, 32, torch.bfloat16, seed=3)
    ours = run(sid_logprob, hidden, head, tokens, 64, 3)
    ref = run(sid_logprob_reference, hidden.float(), head.float(), tokens, 64, 3)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], ref[0], atol=0.1, rtol=0.02)
    torch.testing.assert_close(ours[1].float(), ref[1], atol=0.1, rtol=0.05)


def test_bad_inputs():
    hidden, head, tokens = inputs(4, 8, 16, torch.float32, seed=0)
    with pytest.raises(GreamError, match="agree in H"):
        sid_logprob(hidden, head[:, :8], tokens)
    with pytest.raises(GreamError, match="tokens"):
        sid_logprob(hidden, head, tokens.float())


@pytest.mark.gpu
def test_cuda_matches_reference_at_qwen_head_shape():
    hidden, head, tokens = inputs(16384, 256, 1024, torch.bfloat16, seed=5)
    hidden, head, tokens = hidden.cuda(), head.cuda(), tokens.cuda()
    ours = run(sid_logprob, hidden, head, tokens, 256, 5)
    ref = run(sid_logprob_reference, hidden, head, tokens, 256, 5)
    torch.testing.assert_close(ours[0], ref[0], atol=2e-2, rtol=2e-2)
