"""SRPO's per-token policy loss (METHOD.md section 5), with the reference's constants.

    ratio = exp(clamp(logp - logp_old, -20, 20))
    L1    = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
    L     = min(L1, -A c)        where A < 0 (dual clip, c = 10), else L1
    KL    = clamp(exp(d) - d - 1, -10, 10),  d = clamp(logp_ref - logp, -20, 20)   (k3)
    loss  = mean over all response tokens of the batch of (L + beta KL)
"""
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError


@dataclass(frozen=True)
class SRPOLossConfig:
    clip: float = 0.2
    dual_clip: float = 10.0
    beta: float = 0.001  # weight of the k3 KL to the frozen SFT model
    log_ratio_clamp: float = 20.0
    kl_clamp: float = 10.0


def srpo_loss(logp, logp_old, adv, mask, logp_ref=None, cfg: SRPOLossConfig = SRPOLossConfig(),
              normalizer: float | None = None):
    """Token-mean loss and statistics. logp, logp_old, logp_ref, mask: [R, T] (or [M] flat);
    adv: the same shape, or [R] broadcast over each row's tokens. logp_ref=None or beta = 0
    drops the KL term. normalizer: what the token sums are divided by (default: the tokens in
    `mask`); sharded training passes the step's global token count / world size, so that the
    ranks' averaged gradient is the mean over all the step's tokens."""
    if logp.shape != logp_old.shape or logp.shape != mask.shape:
        raise InvalidInputError(f"logp {list(logp.shape)}, logp_old {list(logp_old.shape)} and "
                                f"mask {list(mask.shape)} must have one shape")
    if adv.shape != logp.shape:
        if adv.dim() != 1 or adv.shape[0] != logp.shape[0]:
            raise InvalidInputError(f"adv: expected {list(logp.shape)} or [{logp.shape[0]}], got "
                                    f"{list(adv.shape)}")
        adv = adv[:, None].expand_as(logp)
    m = mask.to(logp.dtype)
    count = m.sum().clamp(min=1) if normalizer is None else normalizer
    c = cfg.log_ratio_clamp
    ratio = torch.exp((logp - logp_old).clamp(-c, c))
    l1 = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip))
    loss_tok = torch.where(adv < 0, torch.minimum(l1, -adv * cfg.dual_clip), l1)
    # statistics stay on the device (0-d tensors): reading them is the caller's sync to make
    stats = {"clip_fraction": ((((ratio - 1).abs() > cfg.clip).to(m.dtype) * m).sum() / count).detach()}
    if logp_ref is not None and cfg.beta:
        d = (logp_ref - logp).clamp(-c, c)
        kl = (torch.exp(d) - d - 1).clamp(-cfg.kl_clamp, cfg.kl_clamp)
        loss_tok = loss_tok + cfg.beta * kl
        stats["kl"] = ((kl.detach() * m).sum() / count).detach()
    loss = (loss_tok * m).sum() / count
    return loss, stats
