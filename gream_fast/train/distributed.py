"""Multi-process training under `torchrun --nproc-per-node G`: FSDP2 (`fully_shard`) over the
decoder layers and the root, NCCL on GPUs and gloo on CPU (FSDP2 runs on CPU tensors with gloo in
torch >= 2.6: the parameters become DTensors on a CPU mesh; that is how the tests check it).

Without torchrun's environment (no WORLD_SIZE, or WORLD_SIZE=1) `setup` returns a world of one
and every helper here is a no-op: no process group, the model unwrapped, state dicts local.

Checkpoints stay single-file: `full_model_state` / `full_optimizer_state` gather the sharded
state on rank 0 (on CPU) in the layout a single process writes (optimizer state keyed by the
parameter's index in the param groups), and `load_optimizer_state` shards such a state back, so a
checkpoint written by G processes resumes in one and the other way round.

Code that reads the weights outside a forward pass (the decoder runner: SRPO rollouts,
evaluation) runs inside `gathered`, which unshards every FSDP module for the block.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this setup() created the process group (and so destroys it)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise InvalidInputError(f"${name}: not set, but WORLD_SIZE is (launch with torchrun, "
                                    "which sets RANK, WORLD_SIZE and LOCAL_RANK)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(f"${name}: expected an integer, got {raw!r}") from None


def setup(device: str = "auto") -> tuple[World, torch.device]:
    """(world, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK. Initialises the process
    group (nccl on CUDA, gloo on CPU) unless one exists; the device is cuda:LOCAL_RANK when CUDA
    is used. A world of one: no group, and `device` resolved as a single process would."""
    import torch.distributed as dist

    from gream_fast.index.embed import resolve_device

    size = _env_int("WORLD_SIZE", 1)
    if size < 1:
        raise InvalidInputError(f"$WORLD_SIZE: expected >= 1, got {size}")
    if size == 1:
        return World(), resolve_device(device)
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < size:
        raise InvalidInputError(f"$RANK: expected 0..{size - 1}, got {rank}")
    base = resolve_device(device)
    if base.type == "cuda":
        if device not in ("auto", "cuda"):
            raise InvalidInputError(f"--device {device}: under torchrun each process takes "
                                    "cuda:LOCAL_RANK; pass auto, cuda or cpu")
        if local >= torch.cuda.device_count():
            raise InvalidInputError(f"$LOCAL_RANK: {local}, but this node has "
                                    f"{torch.cuda.device_count()} GPUs")
        base = torch.device("cuda", local)
        torch.cuda.set_device(base)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo",
                                device_id=base if base.type == "cuda" else None)
    elif dist.get_world_size() != size or dist.get_rank() != rank:
        raise InvalidInputError(f"$WORLD_SIZE / $RANK: {size} / {rank}, but the process group "
                                f"already initialised has {dist.get_world_size()} / "
                                f"{dist.get_rank()}")
    return World(rank, size, local, owns), base


def launch(train, cfg, progress: bool = True):
    """train(cfg, progress, world, device) in this process's world (setup), the progress bar on
    rank 0 only, the process group torn down after."""
    world, device = setup(cfg.device)
    try:
        return train(cfg, progress and world.is_main, world, device)
    finally:
        teardown(world)


def teardown(world: World) -> None:
    import torch.distributed as dist

    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def decoder_layers(model):
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if layers is None:
        raise InvalidInputError(f"{type(model).__name__}: expected a decoder with "
                                "base_model.layers (Qwen3, Qwen2, Llama) to shard")
    return layers


class LossModule(torch.nn.Module):
    """Root of the sharding: its forward runs `fn(model, *args)`. The losses call
    `model.base_model` and read the LM head's weight directly, which would skip the hooks of an
    FSDP root placed on the model itself (the embeddings, final norm and head would stay
    sharded); with this wrapper as the root they are gathered for the whole loss, forward and
    backward, and their gradients reduced when the backward ends."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def shard_model(model, world: World, fn):
    """FSDP2 over each decoder layer, then a LossModule root holding the rest; returns the
    callable that computes the loss: `fn` bound to the model in a world of one. The model's
    parameters become DTensor shards in place (build the optimizer after this, from `model`)."""
    if not world.distributed:
        return lambda *a, **k: fn(model, *a, **k)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    root = LossModule(model, fn)
    fully_shard(root)
    return root


@contextmanager
def gathered(root, world: World):
    """Whole weights inside the block: every FSDP module under `root` (what shard_model
    returned) is unsharded on entry and resharded on exit, so code that reads the weights
    outside a forward (the decoder runner: rollouts, evaluation) sees plain tensors. Collective:
    every rank enters it. No CUDA graphs inside: the unsharded storage is freed on exit. A
    no-op in a world of one."""
    if not world.distributed:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


# -- collectives ------------------------------------------------------------------------------
def all_reduce(value: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """The sum (op="max": the maximum) over ranks (a new tensor on value's device); `value`
    itself in a world of one. CPU values (statistics) travel through the rank's GPU under
    NCCL, which reduces CUDA tensors only."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else value.device
    out = value.detach().to(dev, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out.to(value.device)


def local(x):
    """A DTensor's full value (e.g. the replicated grad norm) or `x` as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def split_rows(slices: list, world: World, batch_size: int) -> list:
    """This rank's micro-batches of an optimizer step whose micro-batches (in one process) are
    `slices` of packed-row indices: the step's rows are cut into `size` contiguous shares and each
    share into micro-batches of up to `batch_size` rows. Every rank gets the same number of
    micro-batches (FSDP's collectives run per forward): a rank short of rows gets None, a
    micro-batch to run with no labels. A world of one gets `slices` as they are."""
    if not world.distributed:
        return list(slices)
    rows = [i for s in slices for i in range(s.start, s.stop)]
    share = -(-len(rows) // world.size)
    mine = rows[world.rank * share:(world.rank + 1) * share]
    n = max(1, -(-share // batch_size))
    out = [torch.tensor(mine[j * batch_size:(j + 1) * batch_size], dtype=torch.int64)
           for j in range(n)]
    return [t if len(t) else None for t in out]


def share(n: int, world: World) -> range:
    """This rank's contiguous share of n items (shares differ by at most one, in rank order);
    range(n) in a world of one."""
    per, extra = divmod(n, world.size)
    start = world.rank * per + min(world.rank, extra)
    return range(start, start + per + (world.rank < extra))


# -- full state dicts -------------------------------------------------------------------------
def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model, world: World) -> dict | None:
    """The unsharded model state on rank 0, on CPU (None on the other ranks; collective: every
    rank calls it). None in a world of one: the model saves itself."""
    if not world.distributed:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    if not world.is_main:
        return None
    # one name per tied tensor (the embeddings, not lm_head), as a single process saves it
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in names}


def full_optimizer_state(model, optimizer, world: World) -> dict | None:
    """The unsharded optimizer state on rank 0, laid out as a single process's
    `optimizer.state_dict()` (state keyed by the parameter's index over the param groups);
    None on the other ranks (collective). In a world of one: optimizer.state_dict()."""
    if not world.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options())
    if not world.is_main:
        return None
    index = {fqn: i for i, fqn in enumerate(f for g in state["param_groups"] for f in g["params"])}
    groups, i = [], 0
    for g in state["param_groups"]:
        groups.append({**g, "params": list(range(i, i + len(g["params"])))})
        i += len(g["params"])
    return {"state": {index[f]: s for f, s in state["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, optimizer, state: dict, world: World) -> None:
    """Load a single-process-layout optimizer state (every rank holds it whole); sharded onto
    the DTensor parameters when distributed."""
    if not world.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: n for n, p in model.named_parameters()}
    fqns = [names[p] for g in optimizer.param_groups for p in g["params"]]
    groups, i = [], 0
    for g in state["param_groups"]:
        groups.append({**g, "params": fqns[i:i + len(g["params"])]})
        i += len(g["params"])
    full = {"state": {fqns[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
