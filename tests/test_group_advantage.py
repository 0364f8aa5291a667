"""group_advantage (Triton kernel, run through the interpreter on CPU) against its reference and
against the worked numbers of METHOD.md section 5."""
import math

import pytest
import torch

from gream_fast import GreamError
from gream_fast.kernels import group_advantage, group_advantage_reference

LEVELS = torch.tensor([0.0, 0.5, 0.707, 0.866, 0.95, 1.0])


def ragged(sizes, seed, continuous=False):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(sizes)
    ids = torch.randperm(10 * len(sizes), generator=g)[: len(sizes)]  # arbitrary, unsorted ids
    groups = torch.repeat_interleave(ids, sizes)
    if continuous:
        rewards = torch.rand(groups.numel(), generator=g)
    else:
        rewards = LEVELS[torch.randint(0, len(LEVELS), (groups.numel(),), generator=g)]
    return rewards, groups


def python_formula(r, k=4, eps=1e-6):
    """METHOD.md section 5 written out for one group, with math.comb."""
    n = len(r)
    mean = sum(r) / n if n > 1 else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / (n - 1)) if n > 1 else 1.0
    comb = lambda a, b: math.comb(a, b) if 0 <= b <= a else 0
    c = sum(x == 1.0 for x in r)
    out = []
    for x in r:
        a = (x - mean) / (std + eps)
        if n >= k:
            rho = 1 - comb(n - c, k) / comb(n, k)
            sigma = math.sqrt(rho * (1 - rho))
            if x == 1.0:
                a += (1 - rho) / (sigma + eps)
            else:
                a += (1 - rho - comb(n - c - 1, k - 1) / comb(n - 1, k - 1)) / (sigma + eps)
        out.append(a)
    return out


def test_worked_example():
    r = torch.tensor([1, 0.707, 0.5, 0.5] + [0.0] * 6)
    want = torch.tensor([3.168, 1.027, 0.475, 0.475] + [-0.858] * 6)
    for fn in (group_advantage, group_advantage_reference):
        got = fn(r, torch.zeros(10, dtype=torch.long))
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("c, b_plus, b_minus", [(1, 1.225, -0.136), (2, 0.707, -0.177),
                                                (3, 0.447, -0.192), (0, None, 0.0)])
def test_bonus_table(c, b_plus, b_minus):
    # Rewards with a known A_hat: the bonus is what remains.
    r = torch.tensor([1.0] * c + [0.5, 0.0] * 5)[:10]
    g = torch.zeros(10, dtype=torch.long)
    a_hat = (r - r.double().mean().float()) / (r.double().std().float() + 1e-6)
    bonus = group_advantage(r, g) - a_hat
    if b_plus is not None:
        assert bonus[0].item() == pytest.approx(b_plus, abs=1e-3)
    assert bonus[-1].item() == pytest.approx(b_minus, abs=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_groups_match_reference(seed):
    sizes = torch.randint(1, 17, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
    for continuous in (False, True):
        r, g = ragged(sizes, seed, continuous)
        got = group_advantage(r, g)
        want = group_advantage_reference(r, g)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # and both match the formula written out with math.comb
        flat, start = [], 0
        for n in sizes:
            flat += python_formula(r[start:start + n].double().tolist())
            start += n
        torch.testing.assert_close(want, torch.tensor(flat, dtype=torch.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_other_k(k):
    r, g = ragged([1, 2, 5, 8, 3, 10], seed=k)
    torch.testing.assert_close(group_advantage(r, g, k=k), group_advantage_reference(r, g, k=k),
                               atol=1e-5, rtol=1e-5)
    flat = []
    for n, chunk in zip([1, 2, 5, 8, 3, 10], r.split([1, 2, 5, 8, 3, 10])):
        flat += python_formula(chunk.double().tolist(), k=k)
    torch.testing.assert_close(group_advantage(r, g, k=k), torch.tensor(flat, dtype=torch.float32),
                               atol=1e-5, rtol=1e-5)


def test_edge_groups():
    # singletons: mean 0, std 1, no bonus -> A = r / (1 + eps)
    r = torch.tensor([0.3, 1.0, 0.0])
    torch.testing.assert_close(group_advantage(r, torch.arange(3)), r / (1 + 1e-6))
    # smaller than k: plain standardisation, no bonus
    r = torch.tensor([1.0, 0.0, 0.5])
    want = (r - r.mean()) / (r.std() + 1e-6)
    torch.testing.assert_close(group_advantage(r, torch.zeros(3, dtype=torch.long)), want)
    # all equal (including a value with no exact binary form): exactly zero, no bonus
    for v in (0.0, 0.707, 0.95):
        out = group_advantage(torch.full((10,), v), torch.zeros(10, dtype=torch.long))
        assert torch.equal(out, torch.zeros(10))
    # all exact: A_hat = 0, rho = 1 so b+ = 0
    out = group_advantage(torch.ones(6), torch.zeros(6, dtype=torch.long))
    assert torch.equal(out, torch.zeros(6))


def test_token_broadcast_matches_reference():
    r, g = ragged([10] * 7 + [3, 1], seed=11)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 90, (r.numel(),), generator=gen)
    mask = torch.arange(90)[None, :] < lengths[:, None]  # ragged response lengths, some empty
    got = group_advantage(r, g, response_mask=mask)
    assert got.shape == (r.numel(), 90) and got.dtype == torch.float32
    torch.testing.assert_close(got, group_advantage_reference(r, g, response_mask=mask))
    torch.testing.assert_close(got, group_advantage(r, g)[:, None] * mask)
    # float masks and non-contiguous masks give the same
    wide = torch.zeros(r.numel(), 180)
    wide[:, ::2] = mask.float()
    torch.testing.assert_close(group_advantage(r, g, response_mask=wide[:, ::2]), got)


def test_output_is_fully_written(poisoned_empty):
    r, g = ragged([4] * 70 + [1], seed=2)  # 281 responses: three blocks, the last one partial
    mask = torch.rand(r.numel(), 131) > 0.5  # T not a multiple of the token block
    torch.testing.assert_close(group_advantage(r, g), group_advantage_reference(r, g))
    torch.testing.assert_close(group_advantage(r, g, response_mask=mask),
                               group_advantage_reference(r, g, response_mask=mask))


def test_low_precision_rewards():
    r, g = ragged([10] * 5, seed=3)
    torch.testing.assert_close(group_advantage(r.bfloat16(), g.int()),
                               group_advantage_reference(r.bfloat16(), g), atol=1e-5, rtol=1e-5)


def test_empty():
    assert group_advantage(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_raise(bad):
    r = torch.tensor([0.0, 0.5, bad, 1.0])
    with pytest.raises(GreamError, match=r"rewards\[2\] = .*must be finite"):
        group_advantage(r, torch.zeros(4, dtype=torch.long))


def test_bad_inputs():
    r = torch.zeros(6)
    with pytest.raises(GreamError, match=r"groups\[4\] = 0: group 0 appeared earlier"):
        group_advantage(r, torch.tensor([0, 0, 1, 1, 0, 0]))
    with pytest.raises(GreamError, match="groups: expected an integer tensor of shape"):
        group_advantage(r, torch.zeros(5, dtype=torch.long))
    with pytest.raises(GreamError, match="rewards: expected a 1-D float tensor"):
        group_advantage(torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long))
    with pytest.raises(GreamError, match="response_mask: expected shape"):
        group_advantage(r, torch.zeros(6, dtype=torch.long), response_mask=torch.ones(5, 3))


def test_no_exact_hit_gives_no_bonus_at_any_group_size():
    # c = 0: rho and b- are exactly 0; a rounding residue here is amplified by 1 / eps
    sizes = [4, 10, 41, 47, 55, 61, 64]  # 41..61: where a computed rho used to be 6e-8, not 0
    r, g = ragged(sizes, seed=8)
    r = torch.where(r == 1.0, torch.tensor(0.95), r)
    a_hat = torch.cat([(x - x.mean()) / (x.std() + 1e-6) for x in r.double().split(sizes)])
    torch.testing.assert_close(group_advantage(r, g), a_hat.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantage_reference(r, g), a_hat.float(), atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_cuda_no_exact_hit_and_large_groups():
    sizes = list(range(1, 130))
    r, g = ragged(sizes, seed=9)
    r_none = torch.where(r == 1.0, torch.tensor(0.5), r)
    for rr in (r, r_none):
        got = group_advantage(rr.cuda(), g.cuda()).cpu()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, group_advantage_reference(rr, g), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_reference():
    for seed in range(3):
        sizes = torch.randint(1, 40, (500,), generator=torch.Generator().manual_seed(seed)).tolist()
        r, g = ragged(sizes, seed)
        mask = torch.rand(r.numel(), 300, generator=torch.Generator().manual_seed(seed)) > 0.2
        want = group_advantage_reference(r, g, response_mask=mask)
        got = group_advantage(r.cuda(), g.cuda(), response_mask=mask.cuda())
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(group_advantage(r.cuda(), g.cuda()).cpu(),
                                   group_advantage_reference(r, g), atol=1e-5, rtol=1e-5)
