"""File helpers shared by every stage: output paths checked before any work, atomic writes,
and safetensors with checked metadata.

Every output is written to a temporary beside it and renamed into place whole, so readers never
see half a file and an interrupted run loses nothing. Temporaries carry the writer's pid
(`.NAME.PID.XXXX.tmp`): one whose process is gone (killed with SIGKILL, a crash) is removed by
the next write to NAME. A folder a command writes holds MARKER, naming the command, so a later
run may replace its own output but never a folder of the user's (check_output).
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gream_fast.errors import DataError, FormatError, OutputError

MARKER = ".gream-fast.json"  # in each folder a command writes: {"command": "data prepare"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(path) -> list:
    """Remove the temporaries of `path` (a file or folder output) left by processes that are
    gone; returns what was removed. Live writers' temporaries are left alone."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^/]*\.(tmp|old)")
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _check_parent(path: Path, where: str | None = None) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{where or path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{where or path}: cannot write in {anc} (permission denied)")


def written_by(folder, command: str) -> bool:
    """Does `folder` hold the MARKER of `command` (it is that command's earlier output)?"""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("command") == command
    except (OSError, ValueError, AttributeError):
        return False


def check_output(path, *, command: str, inputs=(), folder: bool = True, flag: str = "--out",
                 known=()) -> Path:
    """Refuse an output path before any work is done: the input itself or a folder holding an
    input (`inputs`: paths, None allowed); under a file or in an unwritable folder; for a
    folder output, an existing file or a non-empty folder that `command` did not write (its
    MARKER, or for folders written before markers existed, one of the `known` files the
    command writes); for a file output, an existing folder. Returns the path."""
    p = Path(path).expanduser()
    where = f"{flag} {p}"
    target = p.resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).expanduser().resolve()
        if target == i or target in i.parents:
            what = "is the input" if target == i else "holds the input"
            raise OutputError(f"{where}: it {what} {inp}, which the output would replace; "
                              "choose another output path")
    _check_parent(p, where)
    if folder:
        if p.exists() and not p.is_dir():
            raise OutputError(f"{where}: an existing file; the output is a folder and never "
                              "replaces a file (choose another path)")
        ours = written_by(p, command) or any((p / k).exists() for k in known)
        if p.is_dir() and any(p.iterdir()) and not ours:
            raise OutputError(f"{where}: a folder with files that `gream-fast {command}` did not "
                              "write; choose a new or empty folder (or remove this one)")
    elif p.is_dir():
        raise OutputError(f"{where}: a folder; expected a file path")
    return p


def claim_dir(path, *, command: str, inputs=(), flag: str = "--out", known=()) -> Path:
    """A run folder that a command fills over time (checkpoints, logs): check_output, then
    create it with the command's MARKER, so later runs (--resume) recognise it."""
    p = check_output(path, command=command, inputs=inputs, flag=flag, known=known)
    p.mkdir(parents=True, exist_ok=True)
    if not (p / MARKER).exists():
        (p / MARKER).write_text(json.dumps({"command": command}) + "\n")
    return p


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, so
    an interrupted or failed write never leaves a half-written file behind."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: a folder; expected a file path")
    _check_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path, command: str | None = None):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path` whole
    (an existing folder is swapped out, then removed), so readers never see a partial dataset.
    `command`: the command writing it, recorded in the folder's MARKER (check_output)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: an existing file; expected a folder path")
    _check_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if command is not None:
            (tmp / MARKER).write_text(json.dumps({"command": command}) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".old"))
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
    that is not JSON (or not UTF-8 text, or nested too deeply to parse, or holding NaN or
    Infinity, which JSON does not have) raises a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; expected "
                        "a JSONL file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start}: "
                                f"{raw[e.start:e.start + 1]!r}); is this a JSONL file?") from None
            if not line.strip():
                continue
            yield n, line.rstrip("\n"), loads(line, f"{path}:{n}")


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads(text: str, where: str):
    """json.loads that names `where` in a DataError for anything that is not plain JSON."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def read_jsonl(path) -> list:
    return [value for _, _, value in iter_jsonl(path)]


def write_json(path, value) -> None:
    """A small JSON file (configs, reports), written atomically; NaN or Infinity is refused."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(value, indent=2, allow_nan=False) + "\n",
                             encoding="utf-8")


def write_jsonl(path, rows) -> None:
    """Rows (dicts, or already-serialised lines) to a JSONL file, atomically; a NaN or
    Infinity in a row is refused (JSON has none)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False,
                                                             allow_nan=False)) + "\n")
