"""Triton kernels, each with its torch reference and one dispatching function (DESIGN.md)."""
from gream_fast.kernels.group_advantage import group_advantage, group_advantage_reference
from gream_fast.kernels.residual_quant import assign, centroid_update, encode

__all__ = ["group_advantage", "group_advantage_reference", "assign", "encode", "centroid_update"]
