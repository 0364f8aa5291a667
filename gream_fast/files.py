"""File helpers shared by every stage: atomic writes and safetensors with checked metadata."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gream_fast.errors import DataError, FormatError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, so
    an interrupted or failed write never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path` whole
    (an existing folder is swapped out, then removed), so readers never see a partial dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_arrays(path, arrays: dict, kind: str, version: int, **meta) -> None:
    """Write numpy arrays to a safetensors file tagged with its kind and format version."""
    from safetensors.numpy import save_file

    metadata = {"format": kind, "version": str(version), **{k: str(v) for k, v in meta.items()}}
    # save_file writes an array's memory as it lies: a strided view would be saved scrambled
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # save_file replaces the file: set the mode again


def load_arrays(path, kind: str, version: int, names) -> tuple[dict, dict]:
    """Read a file written by save_arrays; checks its kind, version and that `names` are present."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != kind:
        raise FormatError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {kind!r}")
    if meta.get("version") != str(version):
        raise FormatError(
            f"{path}: metadata 'version' is {meta.get('version')!r}, this build reads {version}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise FormatError(f"{path}: missing tensor(s) {missing}")
    return arrays, meta


def iter_jsonl(path):
    """(line number, raw line, parsed value) for each non-blank line of a JSONL file; a line
    that is not JSON raises a DataError naming the file and line."""
    import json

    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, line.rstrip("\n"), json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def read_jsonl(path) -> list:
    return [value for _, _, value in iter_jsonl(path)]


def write_json(path, value) -> None:
    """A small JSON file (configs, reports), written atomically."""
    import json

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(value, indent=2) + "\n")


def write_jsonl(path, rows) -> None:
    """Rows (dicts, or already-serialised lines) to a JSONL file, atomically."""
    import json

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
