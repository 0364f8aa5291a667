"""Residual-quantization kernels (Triton through the interpreter) against their torch
references on fresh random inputs, including ties and ragged shapes."""
import pytest
import torch

from gream_fast import GreamError
from gream_fast.kernels.residual_quant import (assign, assign_reference, centroid_update,
                                               centroid_update_reference, encode,
                                               encode_reference)

SHAPES = [(1, 3, 5), (7, 20, 37), (100, 48, 70), (130, 33, 16)]  # N < K, K not 2^n, D ragged


@pytest.mark.parametrize("n, k, d", SHAPES)
def test_assign_matches_reference(n, k, d, poisoned_empty):
    g = torch.Generator().manual_seed(n * 31 + k)
    x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    bias = torch.rand(k, generator=g)
    for b in (None, bias):
        idx, val = assign(x, c, b)
        ridx, rval = assign_reference(x, c, b)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(val, rval, atol=1e-4, rtol=1e-5)
    # the value is the true squared distance (+ bias)
    idx, val = assign(x, c)
    torch.testing.assert_close(val, ((x - c[idx]) ** 2).sum(1), atol=1e-4, rtol=1e-5)


def test_ties_go_to_the_lowest_index():
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]] * 20)  # duplicates, K=80
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.5, 0.0]])  # 0.5: equidistant
    idx, _ = assign(x, c)
    assert idx.tolist() == [0, 1, 0, 0] == assign_reference(x, c)[0].tolist()


def test_duplicate_points_and_bf16():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 24, generator=g).repeat(9, 1)  # every point 9 times
    c = torch.randn(40, 24, generator=g)
    idx, _ = assign(x, c)
    assert (idx.view(9, 10) == idx[:10]).all()
    xb, cb = x.bfloat16(), c.bfloat16()
    assert torch.equal(assign(xb, cb)[0], assign_reference(xb, cb)[0])


@pytest.mark.parametrize("n, k, d", SHAPES)
def test_encode_matches_reference(n, k, d, poisoned_empty):
    g = torch.Generator().manual_seed(k)
    x, books = torch.randn(n, d, generator=g), torch.randn(3, k, d, generator=g)
    codes, r = encode(x, books)
    rcodes, rr = encode_reference(x, books)
    assert torch.equal(codes, rcodes)
    torch.testing.assert_close(r, rr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, x - sum(books[l][codes[:, l]] for l in range(3)), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("n, k, d", SHAPES)
def test_centroid_update_matches_reference(n, k, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=g)
    a = torch.randint(0, k, (n,), generator=g)
    sums, counts = centroid_update(x, a, k)
    rs, rc = centroid_update_reference(x, a, k)
    torch.testing.assert_close(sums, rs, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, rc)


def test_bad_inputs():
    with pytest.raises(GreamError, match="must agree in D"):
        assign(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(GreamError, match="bias: expected shape"):
        assign(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(GreamError, match="floating point"):
        assign(torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(GreamError, match="codebooks: expected"):
        encode(torch.zeros(3, 4), torch.zeros(2, 4))


@pytest.mark.gpu
def test_cuda_kernels_match_reference():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5000, 200, generator=g), torch.randn(256, 200, generator=g)
    idx, val = assign(x.cuda(), c.cuda())
    ridx, rval = assign_reference(x, c)
    assert (idx.cpu() == ridx).float().mean() > 0.999  # ties within fp rounding may differ
    torch.testing.assert_close(val.cpu(), rval, atol=1e-3, rtol=1e-4)
    codes, r = encode(x.cuda(), torch.stack([c, c * 0.5]).cuda())
    rcodes, rr = encode_reference(x, torch.stack([c, c * 0.5]))
    assert (codes.cpu() == rcodes).float().mean() > 0.999
    a = torch.randint(0, 256, (5000,), generator=g)
    s, n = centroid_update(x.cuda(), a.cuda(), 256)
    rs, rn = centroid_update_reference(x, a, 256)
    torch.testing.assert_close(s.cpu(), rs, atol=1e-3, rtol=1e-4)
    assert torch.equal(n.cpu(), rn)


def test_float64_inputs_and_bad_cluster_ids():
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(50, 9, generator=g).double(), torch.randn(6, 9, generator=g).double()
    assert torch.equal(assign(x, c)[0], assign_reference(x, c)[0])
    with pytest.raises(GreamError, match=r"cluster ids must lie in 0..6, got 0..9"):
        centroid_update(x.float(), torch.tensor([0] * 49 + [9]), 7)
    with pytest.raises(GreamError, match="integer cluster id"):
        centroid_update(x.float(), torch.zeros(50), 7)
