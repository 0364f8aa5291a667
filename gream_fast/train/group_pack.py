"""Shared-prefix packing for SRPO's log-prob passes: a group's n responses share its prompt.

All groups are packed into one flat stream of N tokens (no padding): each group's prompt, then
each of its responses in turn. Attention: the prompt is causal within itself; a response token
sees the whole prompt and its own response's earlier tokens (never another response's).
Positions restart after the prompt for every response, so each response is computed exactly as
in its own prompt + response sequence, while the prompt runs once per group and its gradient
accumulates once from all n responses. For 5-token responses after a 128-token prompt and n = 10
that is 178 tokens instead of 1,330.

The attention is kernels.group_attention (a GroupLayout of per-token key ranges: memory linear
in the tokens, no [N, N] mask, work ~P^2/2 + n*R*P + n*R^2/2 instead of (P + nR)^2 / 2), put
into the Hugging Face model through its attention interface for the duration of the pass
(packed_pass_mode): the model's own layers and projections run unchanged (on the CPU in
float32 its norms and RoPE run model.fused_cpu's kernels: the same math, one pass each).

Each response token is predicted by the hidden state before it: the prompt's last token for a
response's first token, else the response's previous token.

split_groups cuts a step's groups into packs of at most a token budget (a group too long for
one pack is split between its responses, each part carrying the prompt again), so that the
passes over long reasoning responses fit in memory.
"""
import contextlib
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.kernels.group_attention import GroupLayout, group_attention, group_layout
from gream_fast.model.fused_cpu import fused_ops

ATTENTION = "gream_group"  # the name our attention is registered under in transformers


@dataclass
class GroupBatch:
    input_ids: torch.Tensor  # [1, N] int64: the groups back to back
    position_ids: torch.Tensor  # [1, N]: restart after the prompt for every response
    layout: GroupLayout  # who attends to whom (kernels.group_attention)
    # per response token, in (group, response, token) order:
    source: torch.Tensor  # [M] position of the hidden state that predicts it
    target: torch.Tensor  # [M] the token id
    response: torch.Tensor  # [M] flat response index (group * n + i, as given)
    depth: torch.Tensor  # [M] the token's index in its response (its SID level)
    num_tokens: int  # N

    def dense_mask(self) -> torch.Tensor:
        """[1, 1, N, N] bool, True where a query may attend a key: the layout as a mask, for
        checking the packed pass against SDPA (never used by the pass itself)."""
        lay, n = self.layout, self.num_tokens
        t = torch.arange(n, device=lay.a_lo.device)
        key = t[None, :]
        ok = ((key >= lay.a_lo.long()[:, None]) & (key < lay.a_hi.long()[:, None])) | (
            (key >= lay.b_lo.long()[:, None]) & (key <= t[:, None]))
        return ok[None, None]


def pack_groups(prompts, responses) -> GroupBatch:
    """prompts: G token-id lists; responses: G lists of response token-id lists (any number
    per group, any lengths >= 1)."""
    if len(prompts) != len(responses) or not prompts:
        raise InvalidInputError(f"pack_groups: {len(prompts)} prompts but {len(responses)} "
                                "response groups (expected the same, at least one)")
    for g, (p, rs) in enumerate(zip(prompts, responses)):
        if not p or not rs or any(len(r) == 0 for r in rs):
            raise InvalidInputError(f"pack_groups: group {g} has an empty prompt, no responses "
                                    "or an empty response")
    ids, pos, source, target, resp, depth = [], [], [], [], [], []
    flat = 0
    for p, rs in zip(prompts, responses):
        P, at = len(p), len(ids)
        ids += list(p)
        pos += range(P)
        end = at + P
        for r in rs:
            n = len(r)
            ids += list(r)
            pos += range(P, P + n)
            source += [at + P - 1] + list(range(end, end + n - 1))
            target += list(r)
            resp += [flat] * n
            depth += range(n)
            flat += 1
            end += n
    layout = group_layout([len(p) for p in prompts], [[len(r) for r in rs] for rs in responses])
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return GroupBatch(as_long(ids)[None], as_long(pos)[None], layout, as_long(source),
                      as_long(target), as_long(resp), as_long(depth), len(ids))


def split_groups(prompts, responses, budget: int) -> list:
    """[(group indices, their response lists, flat response indices)]: consecutive packs of the
    groups whose tokens (prompt once + responses) stay within `budget` (0: one pack). A group
    longer than the budget goes into packs of its own, split between responses, each with the
    prompt; a single prompt + response longer than the budget is a pack alone (never dropped).
    The flat response indices say where each pack's responses are in the step's order."""
    if budget < 0:
        raise InvalidInputError(f"token budget: expected >= 0 (0: no limit), got {budget}")
    packs, cur, used, flat = [], ([], [], []), 0, 0

    def close():
        nonlocal cur, used
        if cur[0]:
            packs.append(cur)
        cur, used = ([], [], []), 0

    for g, (p, rs) in enumerate(zip(prompts, responses)):
        size = len(p) + sum(map(len, rs))
        if budget and used + size > budget:
            close()
        if not budget or size <= budget:
            cur[0].append(g)
            cur[1].append(list(rs))
            cur[2].extend(range(flat, flat + len(rs)))
            used += size
            flat += len(rs)
            continue
        for r in rs:  # the group alone does not fit: its responses, the prompt each time
            if cur[0] and used + len(r) > budget:
                close()
            if not cur[0]:
                cur[0].append(g)
                cur[1].append([])
                used = len(p)
            cur[1][-1].append(r)
            cur[2].append(flat)
            used += len(r)
            flat += 1
        close()
    close()
    return packs


def _group_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     gream_layout=None, **kwargs):
    """transformers' attention-interface signature: query [1, Hq, N, D], key / value
    [1, Hkv, N, D] (the flat stream); returns ([1, N, Hq, D], no weights)."""
    if gream_layout is None:
        raise InvalidInputError("the gream_group attention needs the pack's layout: run the "
                                "model through response_hidden")
    kind = query.device.type  # under autocast q, k (normed) and v may differ: as SDPA, cast
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else query.dtype
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))
    return group_attention(q, k, v, gream_layout, scale=scaling, check=False)[None], None


_registered = False


@contextlib.contextmanager
def packed_pass_mode(model):
    """The model as a packed pass runs it: its attention is the group attention (registered
    once with transformers' AttentionInterface; the model's setting restored after) and, on
    float32 CPU tensors, its norms and RoPE model.fused_cpu's kernels. A backward that
    recomputes (checkpointing) must run inside too."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, _group_attention)
        _registered = True
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        with fused_ops(model):
            yield
    finally:
        config._attn_implementation = before


def response_hidden(model, batch: GroupBatch) -> torch.Tensor:
    """Hidden states (after the final norm) that predict every response token, [M, H], from
    one forward of the packed groups through `model`'s base decoder."""
    dev = next(model.parameters()).device
    layout = batch.layout.to(dev)
    with packed_pass_mode(model):
        out = model.model(input_ids=batch.input_ids.to(dev),
                          position_ids=batch.position_ids.to(dev), use_cache=False,
                          gream_layout=layout)
    # (index_select: its backward is an index_add, faster than advanced indexing's)
    return out.last_hidden_state[0].index_select(0, batch.source.to(dev))
