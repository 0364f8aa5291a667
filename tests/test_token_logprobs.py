"""token_logprobs (train.loss): chunked full-vocabulary log-probs of given tokens against plain
torch autograd (log_softmax of the dense logits), value and gradients, on fresh random inputs."""
import pytest
import torch

from gream_fast import GreamError
from gream_fast.train import loss
from gream_fast.train.loss import token_logprobs


def dense(hidden, weight, target):
    return torch.log_softmax(hidden @ weight.T, -1).gather(1, target[:, None]).squeeze(1)


@pytest.mark.parametrize("keep", [True, False], ids=["kept-softmax", "recomputed"])
@pytest.mark.parametrize("m,h,v,chunk", [(37, 16, 50, 8), (5, 8, 33, 64), (64, 12, 97, 1),
                                         (23, 16, 40, None)])
def test_value_and_gradients_match_torch(m, h, v, chunk, keep, monkeypatch):
    """Both backwards: the softmax kept from the forward (a small call) and recomputed."""
    monkeypatch.setattr(loss, "SAVED_PROBS", 1 << 24 if keep else 0)
    g = torch.Generator().manual_seed(m * 1000 + v)
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64).float()
    weight = torch.randn(v, h, generator=g).mul(0.7)
    target = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g)  # like SRPO's: a different weight per log-prob
    ha, wa = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = token_logprobs(ha, wa, target, chunk=chunk)
    want = dense(hb, wb, target)
    assert got.dtype == torch.float32 and got.shape == (m,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a loss that is not a plain sum: its gradient wrt each log-prob depends on all of them
    (upstream * got + got.exp().mean()).sum().backward()
    (upstream * want + want.exp().mean()).sum().backward()
    torch.testing.assert_close(ha.grad, hb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(wa.grad, wb.grad, atol=1e-5, rtol=1e-4)


def test_frozen_weight_and_no_grad():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(21, 8, generator=g)  # no grad wanted (a frozen head)
    target = torch.randint(0, 21, (9,), generator=g)
    token_logprobs(hidden, weight, target, chunk=4).sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    dense(h2, weight, target).sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(hidden, weight, target, chunk=2),
                                   dense(hidden, weight, target), atol=1e-5, rtol=1e-5)


def test_a_second_backward_through_the_kept_softmax_is_refused():
    """The kept softmax becomes the gradient in place: a retained graph's second backward would
    be wrong, so autograd's version check stops it."""
    hidden = torch.randn(6, 8, requires_grad=True)
    lp = token_logprobs(hidden, torch.randn(11, 8), torch.randint(0, 11, (6,)))
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


def test_bad_inputs():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(GreamError, match="target 10 outside"):
        token_logprobs(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(GreamError, match="weight"):
        token_logprobs(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(GreamError, match="hidden"):
        token_logprobs(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(GreamError, match="chunk"):
        token_logprobs(h, w, torch.zeros(4, dtype=torch.long), chunk=-1)


def test_bfloat16_tracks_float32():
    """bf16 hidden and head (the GPU's case): matmuls in bf16, log-softmax in float32."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(30, 16, generator=g).bfloat16()
    weight = torch.randn(70, 16, generator=g).mul(0.5).bfloat16()
    target = torch.randint(0, 70, (30,), generator=g)
    ha, wa = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = token_logprobs(ha, wa, target, chunk=7)
    hb, wb = hidden.float().requires_grad_(), weight.float().requires_grad_()
    want = dense(hb, wb, target)
    assert got.dtype == torch.float32 and ha.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)
    got.sum().backward()
    want.sum().backward()
    assert ha.grad.dtype == wa.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ha.grad.float(), hb.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(wa.grad.float(), wb.grad, atol=0.05, rtol=0.05)


@pytest.mark.gpu
def test_cuda_memory_stays_one_chunk():
    """At a real vocabulary the peak stays far below the dense [M, V] logits + gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    m, h, v = 8192, 1024, 151936  # dense: 5 GB of logits; here ~1.4 GB (mostly grad_w)
    hidden = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16).mul(0.02).requires_grad_()
    target = torch.randint(0, v, (m,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    token_logprobs(hidden, weight, target).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.5 * m * v * 4  # dense: m x v float32 logits alone, then their gradient
