"""How every kernel family picks its backend (the kernel contract of DESIGN.md).

Triton runs on CUDA tensors. On CPU tensors the torch reference runs, except under
TRITON_INTERPRET=1 (set by tests/conftest.py before any kernel import), where the Triton kernel
itself runs through Triton's interpreter so that the CPU test suite exercises it.
"""
import os

import torch

# Triton decides interpreter mode when a kernel is decorated, so read the switch once, at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through the Triton kernel rather than the reference."""
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors)
