"""One SRPO step (METHOD.md section 5), direct or reasoning mode, on the engine's fast paths:

    constrained rollouts (generate.sample: n per prompt, prefill and prompt KV shared; reasoning
    mode: free text until the answer marker, then the SID under the trie and the end token)
 -> residual-sensitive reward from token ids (train.rewards.sid_reward; in reasoning mode gated
    on the think block and the answer, train.rewards.gated_sid_reward)
 -> dynamic sampling: groups whose rewards are all equal teach nothing and are dropped; more
    batches are drawn (up to max_draws) until enough groups remain, then truncated
 -> bonus-calibrated group advantage (kernels.group_advantage)
 -> old, reference and policy log-probs on shared-prefix packed groups (train.group_pack: the
    prompt runs once per group, not n times), free text always over the full vocabulary
    (train.loss.token_logprobs, chunked), the SID per cfg.score
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
from gream_fast.train.loss import token_logprobs
from gream_fast.train.rewards import ThinkFormat, gated_sid_reward, sid_reward
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
    mode: str = "direct"  # responses: the SID ("direct"), or think, then answer ("reasoning")
    think_budget: int = 512  # reasoning mode: free-text tokens before the marker is forced
    bf16: bool = False  # bfloat16 autocast for the log-prob passes (float32 master weights)
    loss: SRPOLossConfig = SRPOLossConfig()


def sid_trie(constraint) -> PrefixTrie:
    """The items' SID tokens without EOS (the reward compares SIDs)."""
    if getattr(constraint, "_sid_trie", None) is None:
        seqs = constraint.trie.sequences().astype("int64")
        seqs[seqs == constraint.eos_token_id] = -1
        constraint._sid_trie = PrefixTrie(seqs)
    return constraint._sid_trie


def response_logprobs(model, batch, constraint=None, score: str = "full",
                      sid_start=None) -> torch.Tensor:
    """Log-prob of every response token of a packed GroupBatch, [M] float32: over the whole
    vocabulary (score="full"; train.loss.token_logprobs, one chunk of [C, V] logits at a time),
    or, for SID tokens, over the token's SID level only (score="sid", the generation engine's
    sid scoring: kernels.sid_logprob, [M, K] logits; the end token after a complete SID is the
    only choice there and scores 0). sid_start [R] (reasoning mode): where each response's SID
    begins; the tokens before it are free text, always scored over the full vocabulary.
    Without it the whole response is the SID (direct mode)."""
    h = response_hidden(model, batch)
    target = batch.target.to(h.device)
    head = model.get_output_embeddings()
    level = batch.depth.to(h.device)
    if sid_start is not None:
        level = level - torch.as_tensor(sid_start, device=h.device)[batch.response.to(h.device)]
    text = level < 0 if score == "sid" else torch.ones_like(target, dtype=torch.bool)
    out = torch.zeros(len(target), device=h.device)
    rows = torch.nonzero(text).flatten()
    if len(rows) and head.bias is not None:  # token_logprobs takes no bias: the dense path
        lp = torch.log_softmax(head(h[rows]).float(), -1)
        out = out.index_put((rows,), lp.gather(1, target[rows, None]).squeeze(1))
    elif len(rows):
        out = out.index_put((rows,), token_logprobs(h[rows], head.weight, target[rows]))
    if score == "full":
        return out
    for d in range(int(level.max()) + 1 if len(level) else 0):
        rows = torch.nonzero((level == d) & (target != constraint.eos_token_id)).flatten()
        if len(rows):
            sl = constraint.level_rows(d)
            out = out.index_put((rows,), sid_logprob(h[rows], head.weight[sl],
                                                     target[rows] - sl.start))
    return out


def _rollout_rewards(policy, prompts, targets, constraint, cfg, seed, tokenizer, fmt):
    """One rollout batch: (token ids [R, W] with -1 padding, rewards [R], matches [R],
    sid_start [R]) on the CPU."""
    trie = sid_trie(constraint)
    tgt = torch.as_tensor(targets).repeat_interleave(cfg.n)
    if cfg.mode == "direct":
        roll = sample(policy, prompts, constraint, n=cfg.n, temperature=cfg.temperature,
                      seed=seed)
        pred = torch.where(roll.mask, roll.tokens, -1).cpu()
        reward, match = sid_reward(pred, tgt, trie, eos_token_id=constraint.eos_token_id)
        return pred, reward, match, torch.zeros(len(pred), dtype=torch.int64)
    if fmt is None:
        raise InvalidInputError("srpo_step: reasoning mode needs the ThinkFormat (fmt) of the "
                                "tokenizer's markers")
    roll = sample(policy, prompts, constraint, tokenizer, n=cfg.n, temperature=cfg.temperature,
                  mode="reasoning", seed=seed, think_budget=cfg.think_budget,
                  answer_ids=fmt.answer, stop_ids=list(fmt.stop) or None)
    pred = torch.where(roll.mask, roll.tokens, -1).cpu()
    start = roll.sid_start.cpu()
    reward, match, _ = gated_sid_reward(pred, start, tgt, trie, constraint.eos_token_id, fmt,
                                        constraint.token_table)
    return pred, reward, match, start


def draw_groups(policy, prompts, targets, constraint, cfg: SRPOStepConfig, seed: int,
                more=None, tokenizer=None, fmt: ThinkFormat | None = None):
    """Rollouts until cfg.groups groups with non-zero reward variance (or max_draws batches).
    The first batch is (prompts, targets); later ones come from more(draw) -> (prompts,
    targets), fresh instances (without it the same prompts are drawn again). Reasoning mode
    (cfg.mode) needs fmt (the markers' ids) and, to find the marker in decoded text, the
    tokenizer. Returns (prompts, responses as token lists, rewards [R], matches [R], draws,
    sid_start [R]: where each response's SID starts, 0 in direct mode)."""
    want = cfg.groups or len(prompts)
    kept_p, kept_r, rewards, matches, starts, draws = [], [], [], [], [], 0
    while len(kept_p) < want and draws < cfg.max_draws:
        if draws and more is not None:
            prompts, targets = more(draws)
        pred, reward, match, start = _rollout_rewards(policy, prompts, targets, constraint, cfg,
                                                      seed + draws, tokenizer, fmt)
        draws += 1
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
            starts.append(start[g * cfg.n:(g + 1) * cfg.n])
    if not kept_p:
        return [], [], torch.zeros(0), torch.zeros(0), draws, torch.zeros(0, dtype=torch.int64)
    return (kept_p, kept_r, torch.cat(rewards), torch.cat(matches), draws,
            torch.cat(starts))


def srpo_step(policy, ref_model, optimizer, prompts, targets, constraint,
              cfg: SRPOStepConfig = SRPOStepConfig(), seed: int = 0, more=None,
              tokenizer=None, fmt: ThinkFormat | None = None) -> dict:
    """One step on `prompts` (token-id lists) whose next items are `targets`; more(draw) gives
    further batches for dynamic sampling; tokenizer and fmt: reasoning mode's (see
    draw_groups). Returns the step's statistics (floats); a step whose every group has zero
    variance updates nothing."""
    if len(prompts) != len(targets) or not prompts:
        raise InvalidInputError(f"srpo_step: {len(prompts)} prompts and {len(targets)} targets")
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()
    g_prompts, g_resp, rewards, matches, draws, starts = draw_groups(
        policy, prompts, targets, constraint, cfg, seed, more, tokenizer, fmt)
    t1 = time.perf_counter()
    stats = {"draws": draws, "kept_groups": len(g_prompts)}
    if not g_prompts:
        return {**stats, "updated": False, "rollout_s": t1 - t0}
    dev = next(policy.parameters()).device
    batch = pack_groups(g_prompts, g_resp)
    groups = torch.arange(len(g_prompts)).repeat_interleave(cfg.n)
    adv = group_advantage(rewards.to(dev), groups.to(dev), k=cfg.k)[batch.response.to(dev)]
    # log-softmax, the loss and the ratios stay float32 under autocast (the log-prob paths
    # upcast the logits); only the decoder's and the head's matmuls run in bfloat16
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    with torch.no_grad(), autocast:
        old = response_logprobs(policy, batch, constraint, cfg.score, starts)
        ref = (response_logprobs(ref_model, batch, constraint, cfg.score, starts)
               if ref_model is not None else None)
    t2 = time.perf_counter()
    policy.train(was_training)
    with autocast:
        logp = response_logprobs(policy, batch, constraint, cfg.score, starts)
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
