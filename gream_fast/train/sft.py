"""Supervised fine-tuning on the curriculum (METHOD.md sections 3-4). `gream-fast train sft`.

The rows of the SFT file are read in file order (the curriculum is the order: nothing is
shuffled), encoded with the chat template (loss on the response only, gream_fast.tasks.chat),
and packed greedily in order into rows of `seq_len` tokens. Each packed row holds several
examples; positions restart at 0 for each and attention stays inside each (a block-causal 4D mask
for SDPA / eager attention; with flash-attn the rows are flattened and the restarting positions
give the varlen boundaries), so a packed batch computes exactly what the examples would alone.
Micro-batches are `batch_size` consecutive packed rows; an optimizer step is `grad_accum`
consecutive micro-batches, and its loss is the mean over all response tokens of the step.
Epochs repeat the same order.

The loss is chunked_cross_entropy on the base model's last hidden states and the LM head's
weight (no [tokens, vocab] logits for the batch). AdamW (no weight decay on norms and biases),
linear warm-up then cosine decay to `min_lr_ratio` x lr, gradient clipping, bf16 autocast on CUDA
(float32 master weights), optional gradient checkpointing.

A run directory holds:
  sft_config.json      the resolved config
  metrics.jsonl        one line per `log_every` steps: step, epoch, loss (mean over the step's
                       response tokens), lr, grad_norm (before clipping), loss_tokens,
                       tokens_per_s (non-padding tokens, prompts included) and step_time_s
                       (both averaged since the previous line), elapsed_s
  checkpoint-STEP/     every `save_every` steps and at the end: the model (safetensors) and
                       tokenizer, optimizer.safetensors (AdamW moments; scalars in
                       trainer_state.json), rng.safetensors, trainer_state.json (step, data
                       position, scheduler); written to a temp folder and renamed
  final/               the last model + tokenizer: what `gream-fast eval --model` loads
`resume=True` continues from the newest checkpoint; on CPU in float32 the result is the same,
bit for bit, as a run that was never interrupted.
"""
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from gream_fast.config import check_ranges
from gream_fast.errors import DataError, FormatError, InvalidInputError
from gream_fast.files import atomic_dir, atomic_path, check_output, claim_dir, write_json
from gream_fast.model.fused_cpu import fused_ops
from gream_fast.tasks.chat import IGNORE_INDEX
from gream_fast.train.loss import chunked_cross_entropy

STATE_FORMAT, STATE_VERSION = "gream-fast-sft", 1
TINY_LR, MODEL_LR = 1e-3, 2e-5  # lr = 0 picks these
# fields that may change between a run and its --resume without changing the result: run
# control, the run folder itself (it may be moved), the starting points, which the checkpoint
# replaces, and the data and index, which are checked by content (data stats, fingerprint)
RESUMABLE = {"resume", "save_every", "keep_checkpoints", "log_every", "stop_after", "device",
             "out", "model", "init", "data_dir", "data", "index"}
PATH_FIELDS = {"model", "data", "index", "data_dir", "out"}  # compared as resolved paths
SID_TOKEN = re.compile(r"<\|[a-z]_\d+\|>")


@dataclass
class SFTConfig:
    model: str = ""
    init: str = ""
    data: str = ""
    out: str = ""
    index: str = ""
    data_dir: str = ""
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: TINY_LR with --init tiny, MODEL_LR with --model
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 10
    epochs: int = 1
    max_steps: int = 0
    clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    stop_after: int = 0
    resume: bool = False
    device: str = "auto"
    bf16: bool = True
    gradient_checkpointing: bool = False
    log_every: int = 1
    chunk: int = 0
    vocab_size: int = 4096
    tiny_size: str = "base"
    history_loss: bool = False


# the run-control flags both training loops share
RUN_HELP = {
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "keep the newest N checkpoints (0: all)",
    "stop_after": "stop after this step with a checkpoint, to go on later with --resume (0: run "
                  "to the end)",
    "resume": "continue from the newest checkpoint in --out",
    "device": "auto (cuda when available), cpu, cuda, cuda:N",
}

HELP = {
    "model": "a local Hugging Face causal-LM folder to fine-tune (SID tokens are added from "
             "--index when given)",
    "init": "tiny: a small random Qwen3 with a tokenizer trained on --data-dir (needs --index)",
    "data": "the SFT rows (JSONL, `gream-fast tasks align` / `tasks mix` output), read in order",
    "out": "run folder: sft_config.json, metrics.jsonl, checkpoint-STEP/, final/",
    "index": "index folder or file: the SID tokens to add (required with --init tiny)",
    "data_dir": "the `data prepare` folder (--init tiny trains its tokenizer on its item texts)",
    "seq_len": "tokens per packed row; longer examples lose the oldest history (left truncation)",
    "batch_size": "packed rows per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": f"peak learning rate (default: {TINY_LR:g} with --init tiny, {MODEL_LR:g} with "
          "--model)",
    "min_lr_ratio": "the cosine decays to this fraction of --lr",
    "warmup_steps": "linear warm-up steps",
    "epochs": "passes over the data (ignored when --max-steps > 0)",
    "max_steps": "optimizer steps (0: --epochs passes); the data repeats in order as needed",
    "clip": "max gradient norm (0: no clipping; the norm is still logged)",
    **RUN_HELP,
    "bf16": "bfloat16 autocast on CUDA (float32 master weights); CPU always runs float32",
    "gradient_checkpointing": "recompute the decoder layers' activations in the backward pass",
    "log_every": "steps per metrics line",
    "chunk": "rows per chunk of the cross-entropy (0: train.loss.default_chunk)",
    "vocab_size": "--init tiny: BPE tokens before the special and SID tokens",
    "tiny_size": "--init tiny: base (hidden 256, 4 layers) or small (hidden 128, 2 layers: "
                 "~3.5x the tokens/s on a CPU; the demo's); see gream_fast/model/tiny.py",
    "history_loss": "beyond METHOD.md (which trains on responses only): also train on the SID "
                    "tokens inside prompts, so every history item is predicted from the ones "
                    "before it, as sequential recommenders train; ~20x the next-item targets "
                    "per token on seqrec rows, for small compute budgets",
}


# -- configuration ----------------------------------------------------------------------------
def check_config(cfg: SFTConfig) -> SFTConfig:
    """Validate `cfg` (before anything is loaded) and resolve the default lr."""
    if bool(cfg.model) == bool(cfg.init):
        raise InvalidInputError("--model / --init: give exactly one (a Hugging Face model folder, "
                                f"or --init tiny); got model={cfg.model!r}, init={cfg.init!r}")
    if cfg.init and cfg.init != "tiny":
        raise InvalidInputError(f"--init: expected 'tiny', got {cfg.init!r}")
    if not cfg.data:
        raise InvalidInputError("--data: required (the SFT rows, JSONL)")
    if not Path(cfg.data).is_file():
        raise InvalidInputError(f"--data {cfg.data}: no such file")
    if not cfg.out:
        raise InvalidInputError("--out: required (the run folder)")
    from gream_fast.model.tiny import TINY_SIZES

    if cfg.tiny_size not in TINY_SIZES:
        raise InvalidInputError(f"--tiny-size: expected one of {', '.join(TINY_SIZES)}, "
                                f"got {cfg.tiny_size!r}")
    if cfg.init == "tiny" and not (cfg.index and cfg.data_dir):
        raise InvalidInputError("--init tiny needs --index (the SID tokens) and --data-dir (the "
                                "dataset whose texts the tokenizer learns)")
    if cfg.model and not (Path(cfg.model) / "config.json").is_file():
        raise FormatError(f"--model {cfg.model}: not a Hugging Face model folder (no config.json)")
    check_ranges(cfg, at_least={"seq_len": 8, "batch_size": 1, "grad_accum": 1, "epochs": 1,
                                "log_every": 1, "vocab_size": 260, **dict.fromkeys(
                                    ("weight_decay", "warmup_steps", "max_steps", "clip",
                                     "save_every", "keep_checkpoints", "stop_after", "chunk"),
                                    0)},
                 positive=() if cfg.lr is None else ("lr",), fractions=("min_lr_ratio",))
    if cfg.lr is None:
        cfg.lr = TINY_LR if cfg.init == "tiny" else MODEL_LR
    check_output(cfg.out, **run_folder(cfg))
    return cfg


def run_folder(cfg: SFTConfig) -> dict:
    """check_output / claim_dir's arguments for the run folder --out."""
    return dict(command="train sft", inputs=[cfg.data, cfg.model, cfg.index, cfg.data_dir],
                known=("sft_config.json",))


# -- model ------------------------------------------------------------------------------------
def _flash_available(device) -> bool:
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def load_pretrained(path, device, index=None):
    """(model, tokenizer) from a local HF causal-LM folder in float32, with the SID tokens of
    `index` added (embeddings resized) when given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gream_fast.index.tokens import add_sid_tokens

    p = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError
        raise FormatError(f"{p}: cannot load its tokenizer ({e})") from None
    attn = "flash_attention_2" if _flash_available(device) else "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32,
                                                     attn_implementation=attn)
    except Exception as e:
        raise FormatError(f"{p}: cannot load it as a causal LM ({e})") from None
    if index is not None:
        add_sid_tokens(tokenizer, model, index=index)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise FormatError(f"{p}: the embeddings have {rows} rows but the tokenizer "
                          f"{len(tokenizer)} tokens (pass --index to add the SID tokens and "
                          "resize them)")
    return model, tokenizer


def build_model(cfg: SFTConfig, device):
    """(model, tokenizer) to start from; with --index, the SID tokens added and the index
    recorded in the model's config (model.index_record; --model without --index keeps what
    its folder records)."""
    from gream_fast.model.index_record import attach
    from gream_fast.tasks.context import load_index

    index = load_index(cfg.index) if cfg.index else None
    if cfg.init == "tiny":
        from gream_fast.model.tiny import build_tiny

        model, tokenizer = build_tiny(cfg.data_dir, index, seed=cfg.seed,
                                      vocab_size=cfg.vocab_size, size=cfg.tiny_size)
    else:
        model, tokenizer = load_pretrained(cfg.model, device, index)
    if index is not None:
        attach(model, index)
    return model, tokenizer


def _lm_head_weight(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise InvalidInputError(f"{type(model).__name__}: expected an LM head without bias "
                                "(a Linear weight [vocab, hidden])")
    return head.weight


# -- data -------------------------------------------------------------------------------------
def load_rows(path) -> tuple[list, list]:
    """(rows, names): the SFT rows of a JSONL file and each one's "FILE:LINE" for errors."""
    from gream_fast.files import iter_jsonl

    rows, names = [], []
    for n, _, value in iter_jsonl(path):
        if not (isinstance(value, dict) and isinstance(value.get("messages"), list)):
            raise DataError(f"{path}:{n}: expected a JSON object with a 'messages' list, got "
                            f"{type(value).__name__}")
        rows.append(value)
        names.append(f"{path}:{n}")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, names


def check_sid_vocab(tokenizer, rows, cfg: SFTConfig) -> None:
    """SID strings of the data must be single tokens, or they would be learnt as BPE pieces."""
    vocab = tokenizer.get_vocab()
    for row in rows[:200]:
        for m in row["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, str):
                continue  # a malformed message: the encoder names its row
            missing = [t for t in SID_TOKEN.findall(content) if t not in vocab]
            if missing:
                raise InvalidInputError(
                    f"--model {cfg.model}: its tokenizer has no token {missing[0]!r}, used in "
                    f"--data {cfg.data}: pass --index to add the SID tokens")


def add_shift_labels(packed: dict) -> dict:
    """packed (gream_fast.tasks.chat.pack) + `shift_labels`: the label each position predicts
    (the next token's, -100 across example boundaries and on padding)."""
    labels, seq = packed["labels"], packed["seq_ids"]
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:, :-1] = torch.where(seq[:, 1:] == seq[:, :-1], labels[:, 1:], IGNORE_INDEX)
    packed["shift_labels"] = shift
    return packed


def sid_token_ids(tokenizer) -> torch.Tensor:
    """Sorted ids of the tokenizer's SID tokens (`<|a_1|>`-style added tokens)."""
    import re

    sid = re.compile(r"<\|[a-z]_\d+\|>")
    return torch.tensor(sorted(i for t, i in tokenizer.get_added_vocab().items()
                               if sid.fullmatch(t)), dtype=torch.int64)


def label_prompt_sids(packed: dict, sid_ids: torch.Tensor) -> dict:
    """Labels on the SID tokens of prompts too (SFTConfig.history_loss)."""
    ids, labels = packed["input_ids"], packed["labels"]
    sid = torch.isin(ids, sid_ids) & (packed["seq_ids"] >= 0)
    packed["labels"] = torch.where(sid & (labels == IGNORE_INDEX), ids, labels)
    return packed


def encode_and_pack(rows, tokenizer, seq_len: int, progress: bool = True,
                    history_loss: bool = False, names=None) -> tuple[dict, dict]:
    """Rows -> packed tensors (gream_fast.tasks.chat.pack) with `shift_labels`: the label each
    position predicts (the next token's, -100 across example boundaries and on padding); with
    history_loss, the prompts' SID tokens are labels too. names: each row's name in errors."""
    from tqdm.auto import tqdm

    from gream_fast.tasks.chat import ChatEncoder

    encoder = ChatEncoder(tokenizer, max_length=seq_len)
    examples, step = [], 512
    with tqdm(total=len(rows), desc="encode", unit="row", disable=not progress, leave=False) as bar:
        for start in range(0, len(rows), step):
            examples += encoder.encode_many(rows[start:start + step], start=start,
                                            names=names and names[start:start + step])
            bar.update(min(step, len(rows) - start))
    packed = encoder.pack(examples, seq_len)
    if history_loss:
        packed = label_prompt_sids(packed, sid_token_ids(tokenizer))
    packed = add_shift_labels(packed)
    labels, seq, shift = packed["labels"], packed["seq_ids"], packed["shift_labels"]
    stats = {"examples": len(examples), "truncated": encoder.num_truncated,
             "packed_rows": int(labels.shape[0]), "tokens": int((seq >= 0).sum()),
             "loss_tokens": int((shift != IGNORE_INDEX).sum())}
    return packed, stats


def attention_inputs(model, input_ids, position_ids, seq_ids) -> dict:
    """Decoder inputs that keep attention inside each packed example."""
    from gream_fast.tasks.chat import block_causal_mask

    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl.startswith("flash"):  # varlen: one flattened row, boundaries where positions restart
        return {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1)}
    mask = block_causal_mask(seq_ids)
    if impl != "sdpa":  # eager and the like add the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}


def packed_loss(model, batch: dict, chunk: int | None = None, normalizer: float | None = None,
                reduction: str = "mean"):
    """(loss, count) of a batch of packed rows (input_ids, position_ids, seq_ids, shift_labels on
    the model's device): the base model's hidden states -> chunked_cross_entropy."""
    inputs = attention_inputs(model, batch["input_ids"], batch["position_ids"], batch["seq_ids"])
    out = model.base_model(**inputs, use_cache=False)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    return chunked_cross_entropy(hidden, _lm_head_weight(model), batch["shift_labels"].reshape(-1),
                                 chunk=chunk or None, reduction=reduction, normalizer=normalizer)


# -- optimizer, schedule ----------------------------------------------------------------------
def make_optimizer(model, cfg: SFTConfig, device):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda" or None)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up over `warmup`
    steps ((step + 1) / warmup, so the first step already moves), then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg: SFTConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


# -- checkpoints ------------------------------------------------------------------------------
def _checkpoints(run_dir: Path) -> list:
    """(step, path) of the complete checkpoints, oldest first."""
    out = []
    for p in run_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, state: dict,
                    keep: int, fmt: str = STATE_FORMAT, model_state: dict | None = None,
                    opt_state: dict | None = None) -> Path:
    """RUN_DIR/checkpoint-STEP, written whole to a temp folder and renamed; prunes old ones.
    fmt names the loop that wrote it (the SFT and SRPO loops share this layout). model_state /
    opt_state: full state dicts gathered from sharded training (train.distributed), written in
    place of the model's and the optimizer's own."""
    from safetensors.torch import save_file

    path = run_dir / f"checkpoint-{state['step']}"
    opt = optimizer.state_dict() if opt_state is None else opt_state
    tensors, scalars = {}, {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    trainer_state = {"format": fmt, "version": STATE_VERSION, **state,
                     "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
                     "scheduler": sched}
    with atomic_dir(path) as tmp:
        save_model(model, tokenizer, tmp, model_state)
        meta = {"format": fmt, "version": str(STATE_VERSION)}
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
        save_file(rng, str(tmp / "rng.safetensors"), metadata=meta)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    if keep:
        for _, old in _checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_model(model, tokenizer, folder, state: dict | None = None) -> None:
    """A Hugging Face folder (safetensors); `state` replaces the model's own (sharded) tensors."""
    model.save_pretrained(folder, safe_serialization=True,
                          **({} if state is None else {"state_dict": state}))
    tokenizer.save_pretrained(folder)


def checkpoint_problem(path: Path, fmt: str = STATE_FORMAT) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a missing or unreadable trainer
    state, a safetensors file that is truncated or not one), or None when it is intact."""
    from safetensors import safe_open

    try:
        load_trainer_state(path, fmt)
    except FormatError as e:
        return str(e)
    weights = sorted(path.glob("model*.safetensors"))
    for f in [*weights, path / "optimizer.safetensors", path / "rng.safetensors"]:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # safetensors' own error types; OSError for a missing file
            return f"{f.name}: {e}"
    return None if weights else "no model*.safetensors"


def resume_point(run_dir: Path, resume: bool, fmt: str = STATE_FORMAT):
    """(checkpoint, its trainer state) to go on from, or (None, None) for a fresh run. With
    resume, the newest intact checkpoint of run_dir: a newer one that cannot be read (a write
    cut short by a full disk, a damaged copy) is skipped and named in a warning, so the run
    never stops on it nor silently loses steps. Checkpoints without resume are refused."""
    found = _checkpoints(run_dir) if run_dir.is_dir() else []
    if found and not resume:
        raise InvalidInputError(f"--out {run_dir}: holds checkpoints of an earlier run; pass "
                                "--resume to continue it, or choose another folder")
    skipped = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path, fmt)
        if problem is None:
            if skipped:
                warnings.warn(f"--resume: skipped {'; '.join(skipped)}; resuming from {path}")
            return path, load_trainer_state(path, fmt)
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        raise FormatError(f"--resume: no intact checkpoint in {run_dir}: {'; '.join(skipped)}")
    return None, None


def load_trainer_state(path: Path, fmt: str = STATE_FORMAT) -> dict:
    f = path / "trainer_state.json"
    try:
        state = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{f}: not a readable trainer state ({e})") from None
    if state.get("format") != fmt or state.get("version") != STATE_VERSION:
        raise FormatError(f"{f}: format {state.get('format')!r} version {state.get('version')!r}"
                          f", expected {fmt!r} version {STATE_VERSION}")
    return state


def restore_optimizer(path: Path, state: dict, optimizer, scheduler, load=None) -> None:
    """load: how to load the rebuilt optimizer state dict (default optimizer.load_state_dict;
    sharded training passes train.distributed.load_optimizer_state)."""
    from safetensors.torch import load_file

    f = path / "optimizer.safetensors"
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise FormatError(f"{f}: not a readable safetensors file ({e})") from None
    opt_state: dict = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        opt_state.setdefault(int(pid), {})[name] = v
    for key, v in state["optimizer"]["scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    groups = state["optimizer"]["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    (load or optimizer.load_state_dict)({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(groups)})


def restore_rng(path: Path) -> None:
    from safetensors.torch import load_file

    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _same(name: str, a, b) -> bool:
    if name in PATH_FIELDS and a and b:  # "runs/x" and "/home/u/runs/x" are one folder
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _check_resume_config(saved: dict, cfg, path: Path, resumable=RESUMABLE) -> None:
    for f in fields(cfg):
        if f.name in resumable or f.name not in saved:
            continue
        if not _same(f.name, saved[f.name], getattr(cfg, f.name)):
            raise InvalidInputError(
                f"--resume: --{f.name.replace('_', '-')} is {getattr(cfg, f.name)!r} but the run "
                f"in {path} was started with {saved[f.name]!r}; resume with the same settings")


# -- the loop ---------------------------------------------------------------------------------
def train(cfg: SFTConfig, progress: bool = True) -> dict:
    """Run (or resume) SFT as configured; returns a summary (steps, final path, last loss,
    tokens/s, seconds).

    Under `torchrun --nproc-per-node G` (train.distributed): the model is sharded with FSDP2,
    each optimizer step's packed rows (batch_size x grad_accum, as in one process) are split
    across the ranks, and the loss is normalised by the step's global label-token count, so the
    update is the single-process one up to float summation order. Rank 0 alone writes the
    metrics, checkpoints and final/ (same single-file format)."""
    from gream_fast.train import distributed

    return distributed.launch(_train, check_config(cfg), progress)


def _micro_batch(packed: dict, rows, keys, device) -> dict:
    """The packed rows `rows` (a slice or index tensor) on `device`; rows None: one row with no
    labels, for a rank with no rows left in a step (its forward and backward still run, as FSDP's
    collectives need, and add zero to the gradients)."""
    batch = {k: packed[k][rows if rows is not None else slice(0, 1)].to(device, non_blocking=True)
             for k in keys}
    if rows is None:
        batch["shift_labels"] = torch.full_like(batch["shift_labels"], IGNORE_INDEX)
    return batch


def _train(cfg: SFTConfig, progress: bool, world, device) -> dict:
    from tqdm.auto import tqdm

    from gream_fast.train import distributed

    run_dir = Path(cfg.out)
    resume_from, state = resume_point(run_dir, cfg.resume)
    rows, names = load_rows(cfg.data)
    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        _check_resume_config(state["config"], cfg, resume_from)
        model, tokenizer = load_pretrained(resume_from, device)
        if cfg.index:  # the path may differ; the index may not
            from gream_fast.model.index_record import check_pairing
            from gream_fast.tasks.context import load_index

            check_pairing(model, load_index(cfg.index), index_name=f"--index {cfg.index}")
    else:
        model, tokenizer = build_model(cfg, device)
        if cfg.model:
            check_sid_vocab(tokenizer, rows, cfg)
    model.to(device).train()
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_fn = distributed.shard_model(model, world, packed_loss)  # packed_loss bound to model

    packed, data_stats = encode_and_pack(rows, tokenizer, cfg.seq_len, progress,
                                         cfg.history_loss, names)
    n_rows = data_stats["packed_rows"]
    per_epoch = -(-n_rows // cfg.batch_size)  # micro-batches per epoch
    total_micro = cfg.max_steps * cfg.grad_accum if cfg.max_steps else cfg.epochs * per_epoch
    total_steps = -(-total_micro // cfg.grad_accum)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    step = 0
    if state is not None:
        if state["data"] != data_stats:
            raise InvalidInputError(f"--resume: --data {cfg.data} now gives {data_stats}, the run "
                                    f"in {resume_from} was trained on {state['data']}: the data "
                                    "changed")
        restore_optimizer(resume_from, state, optimizer, scheduler,
                          load=lambda sd: distributed.load_optimizer_state(model, optimizer, sd,
                                                                           world))
        restore_rng(resume_from)
        step = state["step"]
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:
        claim_dir(run_dir, **run_folder(cfg))
        write_json(run_dir / "sft_config.json", {**asdict(cfg), "total_steps": total_steps,
                                                 "data_stats": data_stats})
        _truncate_metrics(metrics_path, step)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    keys = ("input_ids", "position_ids", "seq_ids", "shift_labels")
    lm_tokens = (packed["shift_labels"] != IGNORE_INDEX).sum(1)
    tokens = (packed["seq_ids"] >= 0).sum(1)
    stop = min(total_steps, cfg.stop_after) if cfg.stop_after else total_steps
    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", disable=not progress)
    started, window_t, window_tokens, window_steps = time.perf_counter(), time.perf_counter(), 0, 0
    last = {}
    # (fused_ops: the model's norms and RoPE as one kernel each on float32 CPU tensors)
    with open(metrics_path if world.is_main else os.devnull, "a") as log, fused_ops(model):
        while step < stop:
            micro = range(step * cfg.grad_accum, min((step + 1) * cfg.grad_accum, total_micro))
            slices = [slice((k % per_epoch) * cfg.batch_size,
                            min((k % per_epoch + 1) * cfg.batch_size, n_rows)) for k in micro]
            count = sum(int(lm_tokens[s].sum()) for s in slices)
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            # the ranks' gradients are averaged (FSDP): each normalises by count / world size
            for rows in distributed.split_rows(slices, world, cfg.batch_size):
                batch = _micro_batch(packed, rows, keys, device)
                with autocast:
                    loss, _ = loss_fn(batch, cfg.chunk, normalizer=count / world.size)
                loss.backward()
                loss_sum += loss.detach()
            window_tokens += sum(int(tokens[s].sum()) for s in slices)
            loss_sum = distributed.all_reduce(loss_sum, world) / world.size
            norm = distributed.local(torch.nn.utils.clip_grad_norm_(
                params, cfg.clip if cfg.clip else float("inf")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                seconds = now - window_t
                last = {"step": step, "epoch": round((micro[-1] + 1) / per_epoch, 4),
                        "loss": loss_sum.item(), "lr": lr, "grad_norm": float(norm),
                        "loss_tokens": count, "tokens_per_s": window_tokens / seconds,
                        "step_time_s": seconds / window_steps,
                        "elapsed_s": now - started}
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                window_t, window_tokens, window_steps = now, 0, 0
            if step == stop or (cfg.save_every and step % cfg.save_every == 0):
                # collectives: every rank gathers, rank 0 writes
                full = distributed.full_model_state(model, world)
                opt_state = distributed.full_optimizer_state(model, optimizer, world)
                if world.is_main:
                    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, {
                        "step": step, "micro_batch": step * cfg.grad_accum,
                        "total_steps": total_steps, "config": asdict(cfg), "data": data_stats},
                        cfg.keep_checkpoints, model_state=full, opt_state=opt_state)
                distributed.barrier(world)
    bar.close()
    final = None
    if step == total_steps:
        final = run_dir / "final"
        full = distributed.full_model_state(model, world)
        if world.is_main:
            with atomic_dir(final) as tmp:
                save_model(model, tokenizer, tmp, full)
        distributed.barrier(world)
    return {"steps": step, "total_steps": total_steps, "final": str(final) if final else None,
            "loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"),
            "seconds": round(time.perf_counter() - started, 3), "data": data_stats}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(k + "\n" for k in keep))

