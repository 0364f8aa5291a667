"""Conversions at the numpy/torch boundary: accept either, hand back what the caller gave."""
import numpy as np

from gream_fast.errors import InvalidInputError


def as_int_array(x, name: str, ndim: int | None = None, keep_int32: bool = False) -> np.ndarray:
    """An integer numpy array (int64, C-contiguous) from a numpy array, torch tensor or list.
    keep_int32 leaves int32 input as it is (hot paths whose C++ side takes both)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise InvalidInputError(f"{name}: not a rectangular array ({e})") from None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{name}: value {arr.max()} does not fit in int64")
    if ndim is not None and arr.ndim != ndim:
        raise InvalidInputError(
            f"{name}: expected a {ndim}-D array, got {arr.ndim}-D with shape {list(arr.shape)}")
    dtype = np.int32 if keep_int32 and arr.dtype == np.int32 else np.int64
    return np.ascontiguousarray(arr, dtype=dtype)


def like(result: np.ndarray, template):
    """`result` as a torch tensor on the template's device if the template was one."""
    if hasattr(template, "detach") and hasattr(template, "device"):
        import torch

        return torch.from_numpy(result).to(template.device)
    return result
