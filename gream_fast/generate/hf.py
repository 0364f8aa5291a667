"""Adapters for Hugging Face `generate`: the exact item constraint as a logits processor.

SIDLogitsProcessor replaces `prefix_allowed_tokens_fn` (one Python call per row per step) with
one batched trie walk (C++) of the generated tokens and one scatter on the scores' device.
"""
import torch
from transformers import LogitsProcessor

from gream_fast.generate.constraint import SIDConstraint


class SIDLogitsProcessor(LogitsProcessor):
    """Mask every row's scores to the trie children of its generated tokens.

    prompt_len: the width of the (left-padded) prompt batch given to `generate`; the tokens
    after it are the SID generated so far. A row past its EOS may only repeat EOS (HF keeps
    such rows with a -1e9 score; an all -inf row would be unsatisfiable)."""

    def __init__(self, constraint: SIDConstraint, prompt_len: int):
        self.constraint = constraint
        self.prompt_len = int(prompt_len)
        a = constraint.trie.to_arrays()
        self._indptr = torch.from_numpy(a["indptr"]).long()
        self._tokens = torch.from_numpy(a["tokens"]).long()
        self._offsets = torch.arange(constraint.max_children)

    def nodes(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Trie node of each row's generated prefix (-1: left the trie, i.e. past EOS)."""
        gen = input_ids[:, self.prompt_len:].cpu().numpy()
        nodes = torch.zeros(gen.shape[0], dtype=torch.int32)
        for j in range(gen.shape[1]):  # SIDs are a handful of tokens: one batched walk each
            nodes = self.constraint.trie.walk(nodes, torch.from_numpy(gen[:, j]).int())
        return nodes

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        nodes = self.nodes(input_ids).long()
        dead = nodes < 0
        start = self._indptr[nodes.clamp(min=0)]
        count = self._indptr[nodes.clamp(min=0) + 1] - start
        slot = start[:, None] + self._offsets[None]
        ok = (self._offsets[None] < count[:, None]) & ~dead[:, None]
        allowed = torch.where(ok, self._tokens[slot.clamp(max=len(self._tokens) - 1)], -1)
        allowed[dead, 0] = self.constraint.eos_token_id
        keep = allowed >= 0
        rows = torch.arange(len(nodes))[:, None].expand_as(allowed)
        mask = torch.full_like(scores, float("-inf"))
        mask[rows[keep].to(scores.device), allowed[keep].to(scores.device)] = 0
        return scores + mask
