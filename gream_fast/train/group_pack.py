"""Shared-prefix packing for SRPO's log-prob passes: a group's n responses share its prompt.

One packed row per group: the prompt, then each response in turn. Attention: the prompt is
causal within itself; a response token sees the whole prompt and its own response's earlier
tokens (never another response's). Positions restart after the prompt for every response,
so each response is computed exactly as in its own prompt + response sequence, while the
prompt runs once per group and its gradient accumulates once from all n responses. For
5-token responses after a 128-token prompt and n = 10 that is 178 tokens instead of 1330.

Each response token is predicted by the hidden state before it: the prompt's last token for a
response's first token, else the response's previous token.
"""
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError


@dataclass
class GroupBatch:
    input_ids: torch.Tensor  # [G, T] int64 (pad_id after each row's end)
    position_ids: torch.Tensor  # [G, T]
    attention_mask: torch.Tensor  # [G, 1, T, T] bool, True where a query may attend a key
    # per response token, in (group, response, token) order:
    row: torch.Tensor  # [M] group row of the token
    source: torch.Tensor  # [M] position of the hidden state that predicts it
    target: torch.Tensor  # [M] the token id
    response: torch.Tensor  # [M] flat response index (group * n + i, as given)
    depth: torch.Tensor  # [M] the token's index in its response (its SID level)
    num_tokens: int  # tokens in the packed rows (without padding)


def pack_groups(prompts, responses, pad_id: int = 0) -> GroupBatch:
    """prompts: G token-id lists; responses: G lists of response token-id lists (any number
    per group, any lengths >= 1)."""
    if len(prompts) != len(responses) or not prompts:
        raise InvalidInputError(f"pack_groups: {len(prompts)} prompts but {len(responses)} "
                                "response groups (expected the same, at least one)")
    lens = []
    for g, (p, rs) in enumerate(zip(prompts, responses)):
        if not p or not rs or any(len(r) == 0 for r in rs):
            raise InvalidInputError(f"pack_groups: group {g} has an empty prompt, no responses "
                                    "or an empty response")
        lens.append(len(p) + sum(len(r) for r in rs))
    width = max(lens)
    G = len(prompts)
    ids = torch.full((G, width), pad_id, dtype=torch.int64)
    pos = torch.full((G, width), -1, dtype=torch.int64)
    mask = torch.zeros(G, 1, width, width, dtype=torch.bool)
    row, source, target, resp, depth = [], [], [], [], []
    flat = 0
    for g, (p, rs) in enumerate(zip(prompts, responses)):
        P = len(p)
        ids[g, :P] = torch.as_tensor(p)
        pos[g, :P] = torch.arange(P)
        mask[g, 0, :P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
        at = P
        for r in rs:
            n = len(r)
            ids[g, at:at + n] = torch.as_tensor(r)
            pos[g, at:at + n] = torch.arange(P, P + n)
            mask[g, 0, at:at + n, :P] = True
            mask[g, 0, at:at + n, at:at + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            row += [g] * n
            source += [P - 1] + list(range(at, at + n - 1))
            target += list(r)
            resp += [flat] * n
            depth += range(n)
            flat += 1
            at += n
        # padding rows attend to themselves only (no all-masked rows: no NaN in attention)
        mask[g, 0, at:, :].zero_()
        mask[g, 0, torch.arange(at, width), torch.arange(at, width)] = True
    return GroupBatch(ids, pos.clamp(min=0), mask, torch.tensor(row), torch.tensor(source),
                      torch.tensor(target), torch.tensor(resp), torch.tensor(depth), sum(lens))


def response_hidden(model, batch: GroupBatch) -> torch.Tensor:
    """Hidden states (after the final norm) that predict every response token, [M, H], from
    one forward of the packed groups through `model`'s base decoder."""
    dev = next(model.parameters()).device
    out = model.model(input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev),
                      attention_mask=batch.attention_mask.to(dev), use_cache=False)
    return out.last_hidden_state[batch.row.to(dev), batch.source.to(dev)]
