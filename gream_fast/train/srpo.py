"""One SRPO step, direct mode (METHOD.md section 5), on the engine's fast paths:

    constrained rollouts (generate.sample: n per prompt, prefill and prompt KV shared)
 -> residual-sensitive reward from token ids (train.rewards.sid_reward)
 -> dynamic sampling: groups whose rewards are all equal teach nothing and are dropped; more
    batches are drawn (up to max_draws) until enough groups remain, then truncated
 -> bonus-calibrated group advantage (kernels.group_advantage)
 -> old, reference and policy log-probs on shared-prefix packed groups (train.group_pack: the
    prompt runs once per group, not n times)
 -> PPO-clip with dual clip + k3 KL to the frozen SFT model, token mean (train.srpo_loss)
 -> clip the gradient norm, optimizer step.
Old log-probs are recomputed by the same packed forward (no_grad) as the policy's, so the
first update's ratio is exactly 1, not the rollout engine's rounding.
"""
import time
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate import sample
from gream_fast.index.trie import PrefixTrie
from gream_fast.kernels import group_advantage, sid_logprob
from gream_fast.train.group_pack import pack_groups, response_hidden
from gream_fast.train.rewards import sid_reward
from gream_fast.train.srpo_loss import SRPOLossConfig, srpo_loss


@dataclass
class SRPOStepConfig:
    n: int = 10  # responses per prompt
    temperature: float = 1.0
    groups: int = 0  # groups kept per step (0: as many prompts as given)
    max_draws: int = 10  # rollout batches drawn at most to fill the groups
    clip_grad: float = 1.0
    k: int = 4  # pass@k of the advantage bonus
    score: str = "full"  # log-prob normalisation: "full" vocabulary or the "sid" level
    loss: SRPOLossConfig = SRPOLossConfig()


def sid_trie(constraint) -> PrefixTrie:
    """The items' SID tokens without EOS (the reward compares SIDs)."""
    if getattr(constraint, "_sid_trie", None) is None:
        seqs = constraint.trie.sequences().astype("int64")
        seqs[seqs == constraint.eos_token_id] = -1
        constraint._sid_trie = PrefixTrie(seqs)
    return constraint._sid_trie


def response_logprobs(model, batch, constraint=None, score: str = "full") -> torch.Tensor:
    """Log-prob of every response token of a packed GroupBatch, [M] float32: over the whole
    vocabulary (score="full"), or over the token's SID level only (score="sid", the
    generation engine's sid scoring: kernels.sid_logprob, [M, K] logits instead of [M, V];
    EOS after a complete SID is the only choice there and scores 0)."""
    h = response_hidden(model, batch)
    target = batch.target.to(h.device)
    if score == "full":
        logits = model.get_output_embeddings()(h).float()
        return torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    weight = model.get_output_embeddings().weight
    out = torch.zeros(len(target), device=h.device)
    depth = batch.depth.to(h.device)
    for d in range(int(batch.depth.max()) + 1):
        rows = torch.nonzero((depth == d) & (target != constraint.eos_token_id)).flatten()
        if len(rows):
            level = constraint.level_rows(d)
            out = out.index_put((rows,), sid_logprob(h[rows], weight[level], target[rows] - level.start))
    return out


def draw_groups(policy, prompts, targets, constraint, cfg: SRPOStepConfig, seed: int,
                more=None):
    """Rollouts until cfg.groups groups with non-zero reward variance (or max_draws batches).
    The first batch is (prompts, targets); later ones come from more(draw) -> (prompts,
    targets), fresh instances (without it the same prompts are drawn again).
    Returns (prompts, responses as token lists, rewards [R], matches [R], draws)."""
    want = cfg.groups or len(prompts)
    trie = sid_trie(constraint)
    kept_p, kept_r, rewards, matches, draws = [], [], [], [], 0
    while len(kept_p) < want and draws < cfg.max_draws:
        if draws and more is not None:
            prompts, targets = more(draws)
        roll = sample(policy, prompts, constraint, n=cfg.n, temperature=cfg.temperature,
                      seed=seed + draws)
        draws += 1
        pred = torch.where(roll.mask, roll.tokens, -1).cpu()
        tgt = torch.as_tensor(targets).repeat_interleave(cfg.n)
        reward, match = sid_reward(pred, tgt, trie, eos_token_id=constraint.eos_token_id)
        reward = reward.view(len(prompts), cfg.n)
        keep = (reward != reward[:, :1]).any(1)  # zero-variance groups are dropped
        for g in torch.nonzero(keep).flatten().tolist():
            if len(kept_p) == want:
                break
            rows = range(g * cfg.n, (g + 1) * cfg.n)
            kept_p.append(prompts[g])
            kept_r.append([pred[r][pred[r] >= 0].tolist() for r in rows])
            rewards.append(reward[g])
            matches.append(match.view(len(prompts), cfg.n)[g])
    if not kept_p:
        return [], [], torch.zeros(0), torch.zeros(0), draws
    return kept_p, kept_r, torch.cat(rewards), torch.cat(matches), draws


def srpo_step(policy, ref_model, optimizer, prompts, targets, constraint,
              cfg: SRPOStepConfig = SRPOStepConfig(), seed: int = 0, more=None) -> dict:
    """One step on `prompts` (token-id lists) whose next items are `targets`; more(draw) gives
    further batches for dynamic sampling (see draw_groups). Returns the step's statistics
    (floats); a step whose every group has zero variance updates nothing."""
    if len(prompts) != len(targets) or not prompts:
        raise InvalidInputError(f"srpo_step: {len(prompts)} prompts and {len(targets)} targets")
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()
    g_prompts, g_resp, rewards, matches, draws = draw_groups(policy, prompts, targets,
                                                             constraint, cfg, seed, more)
    t1 = time.perf_counter()
    stats = {"draws": draws, "kept_groups": len(g_prompts)}
    if not g_prompts:
        return {**stats, "updated": False, "rollout_s": t1 - t0}
    dev = next(policy.parameters()).device
    batch = pack_groups(g_prompts, g_resp)
    groups = torch.arange(len(g_prompts)).repeat_interleave(cfg.n)
    adv = group_advantage(rewards.to(dev), groups.to(dev), k=cfg.k)[batch.response.to(dev)]
    with torch.no_grad():
        old = response_logprobs(policy, batch, constraint, cfg.score)
        ref = (response_logprobs(ref_model, batch, constraint, cfg.score)
               if ref_model is not None else None)
    t2 = time.perf_counter()
    policy.train(was_training)
    logp = response_logprobs(policy, batch, constraint, cfg.score)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, loss_stats = srpo_loss(logp, old, adv, mask, ref, cfg.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad)
    optimizer.step()
    t3 = time.perf_counter()
    return {**stats, "updated": True, "loss": float(loss.detach()), "grad_norm": float(grad_norm),
            "reward_mean": float(rewards.mean()), "exact_rate": float((rewards == 1.0).float().mean()),
            "entropy_proxy": float(-old.mean()), "response_len": len(logp) / len(rewards),
            "tokens": batch.num_tokens, **{k: float(v) for k, v in loss_stats.items()},
            "rollout_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2}
