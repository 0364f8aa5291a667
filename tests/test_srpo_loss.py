"""SRPO policy loss against a per-token Python transcription of METHOD.md section 5."""
import math

import pytest
import torch

from gream_fast import GreamError
from gream_fast.train.srpo_loss import SRPOLossConfig, srpo_loss


def per_token(lp, old, ref, a, beta=0.001):
    ratio = math.exp(max(-20, min(20, lp - old)))
    l1 = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
    loss = min(l1, -a * 10) if a < 0 else l1
    d = max(-20, min(20, ref - lp))
    return loss + beta * max(-10, min(10, math.exp(d) - d - 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_formula(seed):
    g = torch.Generator().manual_seed(seed)
    r, t = 6, 5
    lp = torch.randn(r, t, generator=g, dtype=torch.float64) - 2
    old = lp + torch.randn(r, t, generator=g, dtype=torch.float64) * 0.5  # some ratios clip
    old[0, 0] = lp[0, 0] - 30  # the log-ratio clamp
    ref = lp + torch.randn(r, t, generator=g, dtype=torch.float64)
    adv = torch.randn(r, generator=g, dtype=torch.float64) * 3
    adv[1] = -20.0  # dual clip binds
    mask = torch.rand(r, t, generator=g) > 0.3
    loss, stats = srpo_loss(lp, old, adv, mask, ref)
    want = [per_token(lp[i, j].item(), old[i, j].item(), ref[i, j].item(), adv[i].item())
            for i in range(r) for j in range(t) if mask[i, j]]
    assert float(loss) == pytest.approx(sum(want) / len(want), rel=1e-9)
    assert 0 <= float(stats["clip_fraction"]) <= 1 and float(stats["kl"]) >= 0
    # without the reference model: no KL
    loss0, stats0 = srpo_loss(lp, old, adv, mask)
    want0 = [per_token(lp[i, j].item(), old[i, j].item(), lp[i, j].item(), adv[i].item(), 0)
             for i in range(r) for j in range(t) if mask[i, j]]
    assert float(loss0) == pytest.approx(sum(want0) / len(want0), rel=1e-9) and "kl" not in stats0


def test_gradient_is_the_policy_gradient_on_policy():
    # on-policy (logp == logp_old), no KL: d loss / d logp = -A / count on every kept token
    lp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss, _ = srpo_loss(lp, lp.detach(), adv, mask, cfg=SRPOLossConfig(beta=0))
    loss.backward()
    torch.testing.assert_close(lp.grad, (-adv[:, None] / 12).expand(3, 4))


def test_bad_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(GreamError, match="adv"):
        srpo_loss(x, x, torch.zeros(3), x.bool())
    with pytest.raises(GreamError, match="one shape"):
        srpo_loss(x, torch.zeros(2, 2), torch.zeros(2), x.bool())
