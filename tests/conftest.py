import os

import pytest

# Triton kernels run through the interpreter on CPU; the switch must be set before any kernel
# module is imported (Triton reads it when a kernel is decorated).
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty that returns garbage (NaN / a sentinel) instead of whatever memory held, so a
    kernel that leaves part of its output unwritten fails its test instead of passing by luck."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        out.fill_(float("nan") if out.is_floating_point() else -7777)
        return out

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def torch_kernels(monkeypatch):
    """The kernels' torch paths instead of Triton's interpreter, for tests of the loops around
    them (training, rollouts): each kernel has its own tests against its reference through the
    interpreter, and interpreting every kernel of a training loop would take minutes."""
    from gream_fast.kernels import _backend

    monkeypatch.setattr(_backend, "INTERPRET", False)
