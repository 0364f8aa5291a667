"""One SRPO step (METHOD.md section 5), direct or reasoning mode, on the engine's fast paths:

    constrained rollouts (generate.sample: n per prompt, prefill and prompt KV shared; reasoning
    mode: free text until the answer marker, then the SID under the trie and the end token)
 -> residual-sensitive reward from token ids (train.rewards.sid_reward; in reasoning mode gated
    on the think block and the answer, train.rewards.gated_sid_reward)
 -> dynamic sampling: groups whose rewards are all equal teach nothing and are dropped; more
    batches are drawn (up to max_draws) until enough groups remain, then truncated
 -> bonus-calibrated group advantage (kernels.group_advantage)
 -> reference and policy log-probs on shared-prefix packed groups (train.group_pack: the
    prompt runs once per group, not n times, with kernels.group_attention: no [T, T] mask),
    free text always over the full vocabulary (train.loss.token_logprobs, chunked), the SID
    per cfg.score; in packs of at most cfg.token_budget tokens, each pack's loss
    backpropagated in turn
 -> PPO-clip with dual clip + k3 KL to the frozen SFT model, token mean (train.srpo_loss)
 -> clip the gradient norm, optimizer step; cfg.mini_batches of them per rollout batch (the
    reference: 4), each on its share of the groups.
With one update per rollout batch the old policy is the current one, so the old log-probs are
the policy pass's own (detached; the ratio exactly 1, not the rollout engine's rounding) and
cost no pass; with several, one pass of the rollout policy gives them, and the clip acts.
"""
import contextlib
import time
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate import sample
from gream_fast.index.trie import PrefixTrie
from gream_fast.kernels import group_advantage, sid_logprob
from gream_fast.profiling import phase
from gream_fast.train import distributed
from gream_fast.train.distributed import World
from gream_fast.train.group_pack import (pack_groups, packed_pass_mode, response_hidden,
                                         split_groups)
from gream_fast.train.loss import token_logprobs
from gream_fast.train.rewards import (EXACT_REWARD, ThinkFormat, gated_sid_reward,
                                      level_credit, rank_rewards, sid_reward)
from gream_fast.train.srpo_loss import SRPOLossConfig, srpo_loss


ROLLOUTS = ("sample", "beam")
CREDITS = ("response", "level")
REWARDS = ("residual", "rank")


def check_variants(cfg, flag: str = "") -> None:
    """The rollout / credit / reward choices and the combinations they allow (flag: the
    prefix the error names them by, "--" on the command line)."""
    if cfg.rollout not in ROLLOUTS or (cfg.rollout == "beam" and cfg.mode != "direct"):
        raise InvalidInputError(f"{flag}rollout: expected sample, or beam with {flag}mode "
                                f"direct; got {cfg.rollout} with {flag}mode {cfg.mode}")
    if cfg.credit not in CREDITS or (cfg.credit == "level" and cfg.mode != "direct"):
        raise InvalidInputError(f"{flag}credit: expected response, or level with {flag}mode "
                                f"direct; got {cfg.credit} with {flag}mode {cfg.mode}")
    if cfg.reward not in REWARDS or (cfg.reward == "rank" and (
            cfg.rollout != "beam" or cfg.credit != "response")):
        raise InvalidInputError(f"{flag}reward: expected residual, or rank with {flag}rollout "
                                f"beam and {flag}credit response; got {cfg.reward} with "
                                f"{flag}rollout {cfg.rollout} and {flag}credit {cfg.credit}")


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
    rollout: str = "sample"  # direct mode: n sampled SIDs, or the n best distinct by "beam"
    credit: str = "response"  # advantage per response, or per SID "level" (direct mode)
    reward: str = "residual"  # + "rank": beam groups' ranking-aware term (train.rewards)
    think_budget: int = 512  # reasoning mode: free-text tokens before the marker is forced
    bf16: bool = False  # bfloat16 autocast for the log-prob passes (float32 master weights)
    token_budget: int = 0  # tokens per packed pass (0: each mini-batch in one pass)
    mini_batches: int = 1  # optimizer steps per rollout batch (consecutive groups each)
    checkpointing: bool = False  # recompute the policy's layer activations in the backward
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
    if score == "full":  # every token over the whole vocabulary
        return _full_logprobs(h, head, target)
    level = batch.depth.to(h.device)
    if sid_start is not None:
        level = level - torch.as_tensor(sid_start, device=h.device)[batch.response.to(h.device)]
    out = torch.zeros(len(target), device=h.device)
    rows = torch.nonzero(level < 0).flatten()  # free text: the full vocabulary
    if len(rows):
        out = out.index_put((rows,), _full_logprobs(h[rows], head, target[rows]))
    for d in range(int(level.max()) + 1 if len(level) else 0):
        rows = torch.nonzero((level == d) & (target != constraint.eos_token_id)).flatten()
        if len(rows):
            sl = constraint.level_rows(d)
            out = out.index_put((rows,), sid_logprob(h[rows], head.weight[sl],
                                                     target[rows] - sl.start))
    return out


def _full_logprobs(h, head, target):
    if head.bias is not None:  # token_logprobs takes no bias: the dense path
        return torch.log_softmax(head(h).float(), -1).gather(1, target[:, None]).squeeze(1)
    return token_logprobs(h, head.weight, target)


def _rollout_rewards(policy, prompts, targets, constraint, cfg, seed, tokenizer, fmt):
    """One rollout batch: (token ids [R, W] with -1 padding, rewards [R], matches [R],
    sid_start [R], items [R]: the item each response names, -1 for none) on the CPU."""
    trie = sid_trie(constraint)
    tgt = torch.as_tensor(targets).repeat_interleave(cfg.n)
    if cfg.mode == "reasoning" and fmt is None:
        raise InvalidInputError("srpo_step: reasoning mode needs the ThinkFormat (fmt) of the "
                                "tokenizer's markers")
    with phase("gream.rollout"):
        if cfg.rollout == "beam":
            roll = _beam_rollouts(policy, prompts, constraint, cfg)
        elif cfg.mode == "direct":
            roll = sample(policy, prompts, constraint, n=cfg.n, temperature=cfg.temperature,
                          seed=seed)
        else:
            roll = sample(policy, prompts, constraint, tokenizer, n=cfg.n,
                          temperature=cfg.temperature, mode="reasoning", seed=seed,
                          think_budget=cfg.think_budget, answer_ids=fmt.answer,
                          stop_ids=list(fmt.stop) or None)
    pred = torch.where(roll.mask, roll.tokens, -1).cpu()
    items = roll.items.cpu()
    with phase("gream.reward"):
        if cfg.mode == "direct":
            reward, match = sid_reward(pred, tgt, trie, eos_token_id=constraint.eos_token_id)
            if cfg.reward == "rank":  # beam order: each group's responses best first
                reward = reward + rank_rewards(items == tgt, cfg.n)
            return pred, reward, match, torch.zeros(len(pred), dtype=torch.int64), items
        start = roll.sid_start.cpu()
        reward, match, _ = gated_sid_reward(pred, start, tgt, trie, constraint.eos_token_id,
                                            fmt, constraint.token_table)
    return pred, reward, match, start, items


def _beam_rollouts(policy, prompts, constraint, cfg):
    """The n best distinct items of each prompt by the trie-constrained beam search (n beams,
    cfg.score), as generate.sample's Rollouts: a group of n different real items, ranked by
    the policy (deterministic: no seed, no temperature)."""
    from gream_fast.generate import beam_search
    from gream_fast.generate.sample import Rollouts
    from gream_fast.model import make_runner

    if cfg.n > constraint.num_items:
        raise InvalidInputError(f"rollout beam: n = {cfg.n} distinct items, but the index has "
                                f"{constraint.num_items}")
    res = beam_search(make_runner(policy), prompts, constraint, cfg.n, cfg.n, score=cfg.score)
    tokens = res.tokens.reshape(len(prompts) * cfg.n, -1)
    mask = tokens >= 0
    return Rollouts(tokens.clamp(min=0), torch.zeros(mask.shape, device=tokens.device), mask,
                    res.items.reshape(-1),
                    torch.arange(len(prompts), device=tokens.device).repeat_interleave(cfg.n))


@dataclass
class DrawnGroups:
    """What draw_groups kept, and what the draws looked like before the selection."""
    prompts: list  # G prompts (token-id lists)
    responses: list  # G lists of n response token lists
    rewards: torch.Tensor  # [G * n] float
    matches: torch.Tensor  # [G * n] SID levels matched
    sid_start: torch.Tensor  # [G * n] where each response's SID starts (0 in direct mode)
    draws: int  # rollout batches drawn
    # the learning signal before selection, as sums (they add up across ranks): the first
    # draw's rewards and exact matches over all of its rollouts, and every draw's groups
    first_reward_sum: float = 0.0
    first_exact: float = 0.0
    first_rollouts: float = 0.0
    groups_drawn: float = 0.0
    distinct_items: float = 0.0  # distinct items per kept group, summed over the kept groups


def draw_groups(policy, prompts, targets, constraint, cfg: SRPOStepConfig, seed: int,
                more=None, tokenizer=None, fmt: ThinkFormat | None = None) -> DrawnGroups:
    """Rollouts until cfg.groups groups with non-zero reward variance (or max_draws batches).
    The first batch is (prompts, targets); later ones come from more(draw) -> (prompts,
    targets), fresh instances (without it the same prompts are drawn again). Reasoning mode
    (cfg.mode) needs fmt (the markers' ids) and, to find the marker in decoded text, the
    tokenizer. The responses are token lists, the rewards, matches and SID starts flat over
    the kept groups' responses in order."""
    check_variants(cfg)
    want = cfg.groups or len(prompts)
    kept_p, kept_r, rewards, matches, starts, draws = [], [], [], [], [], 0
    first, drawn, distinct = (0.0, 0.0, 0.0), 0, 0
    while len(kept_p) < want and draws < cfg.max_draws:
        if draws and more is not None:
            prompts, targets = more(draws)
        pred, reward, match, start, items = _rollout_rewards(
            policy, prompts, targets, constraint, cfg, seed + draws, tokenizer, fmt)
        if not draws:  # the rollouts as drawn, before any selection
            first = (float(reward.double().sum()), float((reward == EXACT_REWARD).sum()),
                     float(len(reward)))
        draws += 1
        drawn += len(prompts)
        reward = reward.view(len(prompts), cfg.n)
        keep = (reward != reward[:, :1]).any(1)  # zero-variance groups are dropped
        for g in torch.nonzero(keep).flatten().tolist():
            if len(kept_p) == want:
                break
            rows = slice(g * cfg.n, (g + 1) * cfg.n)
            kept_p.append(prompts[g])
            kept_r.append([t[t >= 0].tolist() for t in pred[rows]])
            rewards.append(reward[g])
            matches.append(match[rows])
            starts.append(start[rows])
            named = items[rows]
            distinct += named[named >= 0].unique().numel()
    if not kept_p:
        return DrawnGroups([], [], torch.zeros(0), torch.zeros(0),
                           torch.zeros(0, dtype=torch.int64), draws, *first, drawn, distinct)
    return DrawnGroups(kept_p, kept_r, torch.cat(rewards), torch.cat(matches), torch.cat(starts),
                       draws, *first, drawn, distinct)


def srpo_step(policy, ref_model, optimizer, prompts, targets, constraint,
              cfg: SRPOStepConfig = SRPOStepConfig(), seed: int = 0, more=None,
              tokenizer=None, fmt: ThinkFormat | None = None, logprob_fn=None,
              world: World = World()) -> dict:
    """One step on `prompts` (token-id lists) whose next items are `targets`; more(draw) gives
    further batches for dynamic sampling; tokenizer and fmt: reasoning mode's (see
    draw_groups). Returns the step's statistics (floats); a step whose every group has zero
    variance updates nothing. Before the selection: rollout_reward_mean and rollout_exact_rate
    (the first draw, every rollout), kept_fraction (kept groups over all groups drawn);
    distinct_items: real items per kept group; after it, reward_mean and exact_rate over the
    kept groups' responses (what the update learns from).

    Sharded (train.distributed): `logprob_fn` is shard_model(policy, world,
    response_logprobs), each rank passes its share of the step's prompts and keeps its groups
    (a group never spans ranks); the rollouts run on whole weights (distributed.gathered)."""
    if len(prompts) != len(targets) or not prompts:
        raise InvalidInputError(f"srpo_step: {len(prompts)} prompts and {len(targets)} targets")
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()
    with distributed.gathered(logprob_fn, world):
        got = draw_groups(policy, prompts, targets, constraint, cfg, seed, more, tokenizer, fmt)
    policy.train(was_training)
    t1 = time.perf_counter()
    draws = distributed.all_reduce(torch.tensor([float(got.draws)]), world, op="max")
    kept, drawn, first_sum, first_exact, first_n, distinct = distributed.all_reduce(
        torch.tensor([len(got.prompts), got.groups_drawn, got.first_reward_sum,
                      got.first_exact, got.first_rollouts, got.distinct_items],
                     dtype=torch.float64), world).tolist()
    # the rollouts' own rewards (the first draw, every group) and how many groups the
    # selection kept: reward_mean and exact_rate below are over the kept groups only
    stats = {"draws": int(draws), "kept_groups": int(kept),
             "kept_fraction": kept / max(drawn, 1.0),
             "rollout_reward_mean": first_sum / max(first_n, 1.0),
             "rollout_exact_rate": first_exact / max(first_n, 1.0),
             "distinct_items": distinct / max(kept, 1.0)}
    if not int(kept):  # the skip is global: no rank runs the FSDP passes
        return {**stats, "updated": False, "rollout_s": t1 - t0}
    out = srpo_update(policy, ref_model, optimizer, got.prompts, got.responses, got.rewards,
                      got.sid_start, constraint, cfg, logprob_fn, world, got.matches)
    return {**stats, **out, "rollout_s": t1 - t0}


def _placeholder_group(constraint):
    """One group of one response, for a rank left without groups (with zero weight)."""
    eos = constraint.eos_token_id
    return [[eos]], [[[eos]]], torch.zeros(1), torch.zeros(1, dtype=torch.int64)


def srpo_update(policy, ref_model, optimizer, prompts, responses, rewards, starts, constraint,
                cfg: SRPOStepConfig = SRPOStepConfig(), logprob_fn=None,
                world: World = World(), matches=None) -> dict:
    """The update on fixed groups: prompts (G token-id lists), responses (G lists of response
    token lists), rewards [R] and sid_start [R] over the responses in order. Advantages are per
    group (cfg.credit "level": per token, from each response's own per-level credit and
    matches [R], the SID tokens it shares with its target); the groups are split into
    cfg.mini_batches runs of consecutive groups, one optimizer
    step each, whose loss is the mean over that mini-batch's response tokens (in a sharded run:
    over every rank's, via the loss normaliser). The statistics are the step's, all ranks'
    together: the token means over every mini-batch, grad_norm the mean of the updates'.

    Old log-probs: with one mini-batch the old policy is the current one, so they are the
    policy pass's own (detached; the ratio exactly 1) and cost no pass; with several, a pass of
    the policy before the first update gives them (the rollout policy's: the later updates'
    ratios move and the clip acts).

    The passes run over packs of at most cfg.token_budget tokens (train.group_pack.split_groups;
    0: one pack per mini-batch): the reference (and old) log-probs pack by pack without
    gradients, then each pack's share of its mini-batch's loss (its token sums over the
    mini-batch's token count) is backpropagated before the next pack runs, so the gradient is
    the whole mini-batch's while only one pack's activations are alive (cfg.checkpointing
    recomputes them layer by layer in the backward). In a sharded run every rank runs as many
    mini-batches, and in each as many packs, as the rank with the most (zero-weight
    placeholders), since FSDP's collectives run per forward and backward."""
    check_variants(cfg)
    t1 = time.perf_counter()
    logprob_fn = logprob_fn or (lambda *a: response_logprobs(policy, *a))
    dev = next(policy.parameters()).device
    empty = not prompts
    if empty:
        prompts, responses, rewards, starts = _placeholder_group(constraint)
        matches = torch.zeros(1, dtype=torch.int64)
    sizes = torch.tensor([len(r) for r in responses])
    groups = torch.repeat_interleave(torch.arange(len(prompts)), sizes)
    with phase("gream.advantage"):
        if cfg.credit == "level":  # [R, W]: each token its own
            if matches is None:
                raise InvalidInputError("srpo_update: per-level credit needs the matches")
            adv_tok = _level_advantages(responses, rewards, matches, groups,
                                        constraint.eos_token_id, cfg.k).to(dev)
        else:
            adv_resp = group_advantage(rewards.to(dev), groups.to(dev), k=cfg.k)
    starts = torch.as_tensor(starts)
    batches = _mini_batches(prompts, responses, cfg, constraint, empty, world)
    # log-softmax, the loss and the ratios stay float32 under autocast (the log-prob paths
    # upcast the logits); only the decoder's and the head's matmuls run in bfloat16
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    refs, olds = [], []
    with torch.no_grad(), autocast, phase("gream.logprob_pass"):
        for i, (packs, _, _) in enumerate(batches):
            if ref_model is not None:
                refs.append([response_logprobs(ref_model, batch, constraint, cfg.score,
                                               starts[flat]) for batch, flat, _ in packs])
            # the rollout policy's, before any update; the first mini-batch runs before any
            # update, so its own pass gives them (None)
            olds.append([logprob_fn(batch, constraint, cfg.score, starts[flat])
                         for batch, flat, _ in packs] if i else None)
    t2 = time.perf_counter()
    totals, norms = None, []
    step_tokens = sum(tokens for _, tokens, _ in batches)
    for i, (packs, tokens, normalizer) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        share = tokens / max(step_tokens, 1.0)  # the mini-batch's part of the step's tokens
        # (the packed pass's mode stays on through the backward: checkpointing recomputes)
        with checkpointing(policy, cfg.checkpointing), packed_pass_mode(policy):
            for j, (batch, flat, w) in enumerate(packs):
                with autocast, phase("gream.logprob_pass"):
                    logp = logprob_fn(batch, constraint, cfg.score, starts[flat])
                old = olds[i][j] if olds[i] is not None else logp.detach()
                mask = torch.full_like(logp, w, dtype=torch.bool)
                rows = flat.to(dev)[batch.response.to(dev)]  # each token's response
                adv = adv_tok[rows, batch.depth.to(dev)] if cfg.credit == "level" else \
                    adv_resp[rows]
                ref = refs[i][j] if refs else None
                with phase("gream.loss"):
                    loss, loss_stats = srpo_loss(logp, old, adv, mask, ref, cfg.loss, normalizer)
                with phase("gream.backward"):
                    loss.backward()
                part = torch.stack([loss.detach() * share,
                                    *(v * share for v in loss_stats.values()),
                                    -(old.double() * mask).sum(),
                                    torch.tensor(float(batch.num_tokens * w))]).double().cpu()
                totals = part if totals is None else totals + part
        with phase("gream.optimizer"):
            norms.append(distributed.local(torch.nn.utils.clip_grad_norm_(
                policy.parameters(), cfg.clip_grad)))
            optimizer.step()
    t3 = time.perf_counter()
    # sums over the ranks; the token means (loss, kl, clip fraction) are already each rank's
    # share of the global mean
    r = rewards.double() * (not empty)
    local = torch.cat([totals, torch.tensor([r.sum(), (r == 1.0).sum(),
                                             len(r) * (not empty)], dtype=torch.float64)])
    total = distributed.all_reduce(local, world).tolist()
    scale = 1 / world.size
    loss_sum, *means = total[:1 + len(loss_stats)]
    neg_old, packed, reward_sum, exact, n_resp = total[1 + len(loss_stats):]
    return {"updated": True, "loss": loss_sum * scale,
            "grad_norm": float(torch.stack(norms).mean()),
            "reward_mean": reward_sum / n_resp, "exact_rate": exact / n_resp,
            "entropy_proxy": neg_old / max(step_tokens, 1.0),
            "response_len": step_tokens / n_resp, "tokens": int(packed),
            **{k: v * scale for k, v in zip(loss_stats, means)}, "updates": len(batches),
            "packs": sum(len(b[0]) for b in batches), "scoring_s": t2 - t1, "update_s": t3 - t2}


def _level_advantages(responses, rewards, matches, groups, eos_token_id, k):
    """Per-level credit's advantages [R, W]: train.rewards.level_credit per token, then the
    group advantage of each (group, depth) over the responses that have a token there (the end
    tokens form a depth of their own: responses may differ in length)."""
    flat = [r for group in responses for r in group]
    lengths = torch.tensor([len(r) for r in flat])
    ends = torch.tensor([bool(r) and r[-1] == eos_token_id for r in flat])
    credit = level_credit(lengths, ends, torch.as_tensor(matches), rewards == EXACT_REWARD)
    R, W = credit.shape
    d = torch.arange(W)[None].expand(R, W)
    valid = d < lengths[:, None]
    depth = torch.where(ends[:, None] & (d == lengths[:, None] - 1), W, d)
    bucket = (groups[:, None] * (W + 1) + depth)[valid]
    order = torch.argsort(bucket, stable=True)  # a bucket's entries contiguous
    values = torch.empty(len(order))
    values[order] = group_advantage(credit[valid][order], bucket[order], k=k)
    adv = torch.zeros(R, W)
    adv[valid] = values
    return adv


def _mini_batches(prompts, responses, cfg, constraint, empty, world):
    """[(packs, tokens, normalizer)] per mini-batch: packs [(GroupBatch, flat response index,
    weight)], the mini-batch's response tokens over all ranks, and what its token sums are
    divided by (tokens / world size). Every rank gets the same number of mini-batches and, in
    each, of packs (zero-weight placeholders where it has fewer)."""
    count = int(distributed.all_reduce(torch.tensor([float(min(cfg.mini_batches,
                                                               len(prompts)))]), world, op="max"))
    bounds = torch.linspace(0, len(prompts), count + 1).round().long().tolist()
    first = [sum(len(r) for r in responses[:g]) for g in bounds]  # flat index of each start
    batches = [[(pack_groups([prompts[a + g] for g in gs], rs), torch.tensor(flat) + f,
                 not empty) for gs, rs, flat in split_groups(prompts[a:b], responses[a:b],
                                                              cfg.token_budget)]
               for a, b, f in zip(bounds, bounds[1:], first)]
    # two collectives for all the mini-batches: the most packs of any rank, the token counts
    most = distributed.all_reduce(torch.tensor([float(len(p)) for p in batches]), world,
                                  op="max").long().tolist()
    tokens = distributed.all_reduce(torch.tensor([float(sum(
        batch.target.numel() for batch, _, w in packs if w)) for packs in batches]),
        world).tolist()
    out = []
    for packs, m, t in zip(batches, most, tokens):
        for _ in range(m - len(packs)):  # a rank with fewer packs runs zero-weight ones
            p, r, _, _ = _placeholder_group(constraint)
            packs.append((pack_groups(p, r), torch.zeros(1, dtype=torch.int64), False))
        out.append((packs, t, max(t, 1.0) / world.size))
    return out


@contextlib.contextmanager
def checkpointing(model, on: bool):
    """Hugging Face gradient checkpointing of the decoder layers inside the block (the
    activations of one layer at a time are recomputed in the backward), off again after.
    Transformers checkpoints a layer only while that layer is in training mode, and a policy
    that was just sampled from (or loaded by from_pretrained) is in eval mode: the layers alone
    are put in training mode for the block, their submodules stay as they are (no dropout
    turns on)."""
    if not on:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    modes = [m.training for m in layers]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        for m in layers:
            m.training = True  # (not .train(): that would reach the attention's dropout)
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode
        model.gradient_checkpointing_disable()
