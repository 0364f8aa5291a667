"""Constrained sampling for SRPO rollouts: n responses per prompt, every one a real item.

The n samples of a prompt share its prefill and its prompt KV (rows_per_prompt = n in the
runner). Each step samples from the node's children, renormalised over them with the
temperature and nucleus top_p (sample_children); the reported log-prob of a token is the
policy's own, log-softmax at temperature 1 over the whole vocabulary (score="full") or over
the level's SID tokens (score="sid"), the quantity the SRPO loss recomputes. EOS after a
complete SID is forced and gets its log-prob like any token (0 under score="sid").
"""
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate.beam import step_candidates
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.generate.recommend import encode_prompts
from gream_fast.kernels.trie_logits import sample_children
from gream_fast.model.runner import make_runner


@dataclass
class Rollouts:
    tokens: torch.Tensor  # [B * n, T] int64 response tokens (SID + EOS), pad_id after the end
    logprobs: torch.Tensor  # [B * n, T] float32 per-token log-probs of the sampling policy
    mask: torch.Tensor  # [B * n, T] bool, True on response tokens
    items: torch.Tensor  # [B * n] int64 the item each response names
    prompt: torch.Tensor  # [B * n] int64 prompt index of each row (groups are contiguous)


@torch.no_grad()
def sample(model, prompts, index, tokenizer=None, n: int = 10, temperature: float = 1.0,
           top_p: float = 1.0, mode: str = "direct", score: str = "full", seed: int = 0,
           pad_id: int | None = None, runner=None) -> Rollouts:
    """n trie-constrained samples per prompt (direct mode: the response is the SID + EOS).
    Seeded: the same seed gives the same rollouts on the same device."""
    if mode != "direct":
        raise InvalidInputError(f"mode: only 'direct' sampling is implemented, got {mode!r}")
    if n < 1:
        raise InvalidInputError(f"n: expected >= 1, got {n}")
    runner = runner or make_runner(model)
    constraint = index if isinstance(index, SIDConstraint) else SIDConstraint(
        index, tokenizer, device=runner.device)
    prompts = encode_prompts(tokenizer, prompts)
    dev = runner.device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    b, steps = len(prompts), constraint.max_len
    rows = b * n
    pad = constraint.eos_token_id if pad_id is None else pad_id
    hidden, state = runner.prefill(prompts, n, steps)
    hidden = hidden.repeat_interleave(n, 0)  # the n samples of a prompt start from its state
    nodes = torch.zeros(rows, dtype=torch.int32, device=dev)
    tokens = torch.full((rows, steps), pad, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(rows, steps, device=dev)
    mask = torch.zeros(rows, steps, dtype=torch.bool, device=dev)
    for t in range(steps):
        live = torch.nonzero(nodes >= 0).flatten()
        s, tok, child = step_candidates(runner, hidden[live], nodes[live], constraint, t,
                                        constraint.max_children, score)
        _, tok, child, lp = sample_children(s, tok, child, temperature, top_p, generator=gen)
        tokens[live, t], logprobs[live, t], mask[live, t] = tok, lp, True
        ended = tok == constraint.eos_token_id
        nodes[live] = torch.where(ended, -1, child.to(nodes.dtype))
        if t == steps - 1 or not bool((nodes >= 0).any()):
            break
        hidden = runner.decode(torch.where(nodes >= 0, tokens[:, t], pad), state)
    ends = mask.sum(1) - 1
    items = constraint.trie.lookup(
        torch.where(mask, tokens, -1).cpu().numpy())
    items = torch.as_tensor(items, device=dev).long()
    if bool((items < 0).any()) or bool((tokens[torch.arange(rows), ends] != constraint.eos_token_id).any()):
        raise RuntimeError("a sampled response is not a complete item (cannot happen)")
    prompt = torch.arange(b, device=dev).repeat_interleave(n)
    return Rollouts(tokens, logprobs, mask, items, prompt)
