"""Triton kernels, each with its torch reference and one dispatching function (DESIGN.md)."""
from gream_fast.kernels.group_advantage import group_advantage, group_advantage_reference
from gream_fast.kernels.group_attention import (GroupLayout, group_attention,
                                                group_attention_reference, group_layout)
from gream_fast.kernels.prefix_attention import (shared_prefix_attention,
                                                 shared_prefix_attention_reference)
from gream_fast.kernels.residual_quant import assign, centroid_update, encode
from gream_fast.kernels.sid_logprob import sid_logprob, sid_logprob_reference
from gream_fast.kernels.trie_logits import sample_children, trie_topk, trie_topk_reference

__all__ = ["group_advantage", "group_advantage_reference", "GroupLayout", "group_layout",
           "group_attention", "group_attention_reference", "assign", "encode", "centroid_update",
           "shared_prefix_attention", "shared_prefix_attention_reference", "trie_topk",
           "trie_topk_reference", "sample_children", "sid_logprob", "sid_logprob_reference"]
