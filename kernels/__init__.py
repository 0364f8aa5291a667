"""Triton kernels, each with its torch reference and one dispatching function (DESIGN.md)."""
from gream_fast.kernels.group_advantage import group_advantage, group_advantage_reference

__all__ = ["group_advantage", "group_advantage_reference"]
