"""Multi-process SFT and SRPO (gream_fast.train.distributed): two CPU processes with the gloo
backend and FSDP2 against the single-process run on the same data, and checkpoints that move
between the two. SRPO's rollouts are random per rank, so its equality is checked where it must
hold: the update on fixed groups; the whole loop is checked to run, write once and resume.

The two processes are forked from the test (torch, transformers and the data already imported:
a spawn would re-import them, tens of seconds on a loaded 2-core machine); each sets torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and goes through the same setup()
as `torchrun --nproc-per-node 2 -m gream_fast.cli train sft ...`.

Tolerance: a rank's micro-batch of one row gives the gradient bit for bit that the same row
gives in one process (with the same thread count), but the single process runs the step's two
rows as one micro-batch (other float32 summation order in the matrix products and the loss) and
computes the grad norm over whole tensors, not shards. Those last-bit differences pass through
AdamW, whose update lr * m / (sqrt(v) + eps) amplifies them on the coordinates with gradients
near eps: atol 1e-4 (10% of one step's update at lr 1e-3) on the weights after 3 steps;
observed max 1.5e-6 (mean 6e-9) with AVX-512 kernels, 2.0e-5 on the tied model with AVX2 ones
(ATEN_CPU_CAPABILITY=avx2 and OpenBLAS as Haswell: another CPU's summation order)."""
import functools
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gream_fast.files import MARKER
from gream_fast.train.distributed import World, setup, share, split_rows
from gream_fast.train.sft import SFTConfig, train

from tiny_data import make_data_and_index

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small SFT file and the tiny model saved as a Hugging Face folder (with its SID tokens):
    the ranks load it instead of training a tokenizer each."""
    from gream_fast.files import write_jsonl
    from gream_fast.model.tiny import build_tiny
    from gream_fast.tasks.align import AlignConfig, AlignmentBuilder
    from gream_fast.tasks.context import TaskContext

    root = tmp_path_factory.mktemp("dist")
    data, index = make_data_and_index(root, users=20)
    rows = AlignmentBuilder(TaskContext(data, index),
                            AlignConfig(passes=1, tasks="seqrec,item2index")).build()
    write_jsonl(root / "small.jsonl", rows[:8])
    model, tokenizer = build_tiny(root / "data", index, out_dir=root / "model", seed=0)
    # a copy with the LM head tied to the embeddings (as Qwen3-0.6B has it)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(root / "tied")
    tokenizer.save_pretrained(root / "tied")
    return root


def cfg(root, out, **kw):
    # 8 rows -> 3 packed rows; batch 2, no accumulation: the steps take rows [0, 1], [2], [0, 1],
    # so with 2 ranks each gets one row, then rank 1 none (a no-label micro-batch)
    base = dict(model=str(root / "model"), data=str(root / "small.jsonl"), out=str(out),
                seq_len=256, batch_size=2, grad_accum=1, max_steps=3, warmup_steps=1,
                save_every=2, keep_checkpoints=0, lr=1e-3, device="cpu")
    return SFTConfig(**{**base, **kw})


def _rank_main(rank, world_size, port, jobs, interpret):
    """jobs: SFT configs (train(job) runs) or picklable callables; interpret: the kernels'
    backend switch as the test has it (the torch_kernels fixture may have turned it off)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    from gream_fast.kernels import _backend
    from gream_fast.train import distributed

    _backend.INTERPRET = interpret

    world, _ = distributed.setup("cpu")
    assert world.owns_group and world.size == world_size and world.rank == rank
    try:
        for job in jobs:
            job() if callable(job) else train(job, progress=False)
    finally:
        distributed.teardown(world)


def run_ranks(jobs, world_size=2, timeout=300):
    """Run train(job) for each job in `world_size` processes sharing one gloo group. Started
    from a fork server, not forked from pytest: a fork of this many-threaded process (torch's,
    numba's and earlier tests' thread pools) crashed a rank in gloo now and then."""
    import torch.multiprocessing as mp

    from gream_fast.kernels import _backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(world_size, port, jobs, _backend.INTERPRET),
                             nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world_size} ranks did not finish in {timeout} s")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def weights(run):
    return load_file(run / "final" / "model.safetensors")


def rewind(run):
    """Drop what came after checkpoint-2, to resume the run from there (--out is part of the
    config a resume must match, so it resumes in place)."""
    shutil.rmtree(run / "checkpoint-3")
    shutil.rmtree(run / "final")


@pytest.fixture
def one_thread():
    """The ranks run one thread each; so does the single process compared with them (another
    thread count splits the matrix products' sums differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_ranks_match_one(tiny_run, tmp_path, one_thread):
    root = tiny_run
    assert train(cfg(root, tmp_path / "one"), progress=False)["steps"] == 3
    a = weights(tmp_path / "one")
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    ckpt1 = {n: load_file(tmp_path / "one" / "checkpoint-2" / n)
             for n in ("model.safetensors", "optimizer.safetensors")}
    rewind(tmp_path / "one")
    tied = dict(model=str(root / "tied"), max_steps=1, save_every=0)
    train(cfg(root, tmp_path / "tied1", **tied), progress=False)

    # a fresh run on two ranks, the single-process run resumed on two ranks, a tied model
    run_ranks([cfg(root, tmp_path / "two"), cfg(root, tmp_path / "one", resume=True),
               cfg(root, tmp_path / "tied2", **tied)])

    two = weights(tmp_path / "two")
    assert max_diff(a, two) < ATOL
    initial = load_file(root / "model" / "model.safetensors")
    assert max_diff(a, initial) > 10 * ATOL  # the runs did train
    # rank 0 alone wrote the metrics: the same losses and token counts
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m2] == [1, 2, 3]
    assert [m["loss_tokens"] for m in m1] == [m["loss_tokens"] for m in m2]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], abs=1e-5)
    assert [m["grad_norm"] for m in m2] == pytest.approx([m["grad_norm"] for m in m1], rel=1e-4)
    # the checkpoints have one layout: the same tensors under the same names
    for name, tensors in ckpt1.items():
        assert max_diff(tensors, load_file(tmp_path / "two" / "checkpoint-2" / name)) < ATOL
    # the ranks resumed a single-process checkpoint ...
    assert max_diff(a, weights(tmp_path / "one")) < ATOL
    # ... and one process resumes theirs
    rewind(tmp_path / "two")
    assert train(cfg(root, tmp_path / "two", resume=True), progress=False)["steps"] == 3
    assert max_diff(a, weights(tmp_path / "two")) < ATOL
    # tied weights: saved once, under the embeddings' name, as one process saves them
    t1, t2 = weights(tmp_path / "tied1"), weights(tmp_path / "tied2")
    assert "lm_head.weight" not in t2 and max_diff(t1, t2) < ATOL


def test_split_rows():
    two = [World(r, 2, r) for r in range(2)]
    got = [split_rows([slice(0, 2), slice(2, 3)], w, batch_size=2) for w in two]
    assert [[t.tolist() for t in g] for g in got] == [[[0, 1]], [[2]]]
    got = [split_rows([slice(4, 5)], w, batch_size=2) for w in two]
    assert got[0][0].tolist() == [4] and got[1] == [None]  # rank 1: a no-label micro-batch
    got = [split_rows([slice(0, 4), slice(4, 8), slice(8, 10)], w, batch_size=2) for w in two]
    assert [[t.tolist() for t in g] for g in got] == [[[0, 1], [2, 3], [4]],
                                                      [[5, 6], [7, 8], [9]]]
    assert split_rows([slice(0, 3)], World(), batch_size=1) == [slice(0, 3)]


def test_share():
    two = [World(r, 2, r) for r in range(2)]
    assert [list(share(3, w)) for w in two] == [[0, 1], [2]]
    assert [list(share(1, w)) for w in two] == [[0], []]  # rank 1: the placeholder group
    assert [list(share(5, World(r, 3, r))) for r in range(3)] == [[0, 1], [2, 3], [4]]
    assert share(4, World()) == range(4)


def test_setup_without_torchrun(monkeypatch):
    from gream_fast import InvalidInputError

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world, device = setup("cpu")
    assert world == World() and not world.distributed and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InvalidInputError, match=r"\$RANK: not set"):
        setup("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InvalidInputError, match=r"\$RANK: expected an integer, got 'x'"):
        setup("cpu")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(InvalidInputError, match=r"\$RANK: expected 0..1, got 2"):
        setup("cpu")


# -- SRPO -------------------------------------------------------------------------------------
# Fixed groups (prompts, responses SID + EOS, rewards) for the update test: 3 groups, then 1.
SRPO_GROUPS = [
    ([[3, 4, 5], [6, 7], [8, 9, 10, 11]],
     [[[20, 24, 2], [21, 25, 2], [20, 24, 2], [23, 27, 2]],
      [[22, 26, 2], [22, 26, 2], [21, 24, 2], [20, 25, 2]],
      [[21, 27, 2], [23, 24, 2], [22, 25, 2], [21, 26, 2]]],
     [1.0, 0.5, 1.0, 0.0, 0.707, 0.707, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]),
    ([[12, 13]], [[[20, 26, 2], [21, 24, 2], [22, 27, 2], [20, 26, 2]]], [1.0, 0.0, 0.5, 1.0]),
]


def srpo_updates(out, mini_batches=1):
    """Two srpo_update calls on SRPO_GROUPS, each rank taking its contiguous share of the
    groups (3 -> 2 + 1: unequal token counts; 1 -> 1 + 0: rank 1 runs the zero-weight
    placeholder); writes the final weights and the statistics (rank 0 / the single process)."""
    import copy

    from safetensors.torch import save_file

    from gream_fast.train import distributed
    from gream_fast.train.srpo import SRPOStepConfig, response_logprobs, srpo_update
    from test_srpo_step import setup as tiny_policy

    world, _ = distributed.setup("cpu")  # the group the ranks already joined, or a world of one
    model, con = tiny_policy(seed=0)
    ref = copy.deepcopy(model).eval()
    root = distributed.shard_model(model, world, response_logprobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # the weights move by the clipped grad
    stats = []
    for prompts, responses, rewards in SRPO_GROUPS:
        mine = distributed.share(len(prompts), world)
        n = len(responses[0])
        stats.append(srpo_update(
            model, ref, opt, prompts[mine.start:mine.stop], responses[mine.start:mine.stop],
            torch.tensor(rewards[mine.start * n:mine.stop * n]),
            torch.zeros(len(mine) * n, dtype=torch.int64), con,
            SRPOStepConfig(n=n, clip_grad=1.0, mini_batches=mini_batches), root, world))
    state = distributed.full_model_state(model, world)
    if world.is_main:
        state = state if state is not None else model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        (out / "stats.json").write_text(json.dumps(stats))


@pytest.mark.usefixtures("torch_kernels")
def test_srpo_update_two_ranks_match_one(tmp_path, one_thread):
    """The update on fixed groups split over two ranks is the single-process update on all of
    them: the loss normaliser makes the averaged gradient the global token mean, and the
    gradient norm (clipped to 1.0) is the norm over all shards.

    Tolerance: the ranks' packed forwards run other batch shapes than the single process's (2 or
    1 groups vs 3: other float32 summation orders in the matrix products), and the gradients are
    summed across ranks in another order; plain SGD (lr 0.5) moves the weights by the clipped
    gradient, so their difference is lr x those last-bit differences of a gradient of norm <= 1:
    atol 1e-6 on the weights (observed max 6e-8; the two updates move them by up to 0.12)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    srpo_updates(tmp_path / "one")
    run_ranks([functools.partial(srpo_updates, tmp_path / "two")], timeout=180)
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    initial = __import__("test_srpo_step").setup(seed=0)[0].state_dict()
    assert max_diff(one, {k: initial[k] for k in one}) > 1e-3  # the updates moved the weights
    assert max_diff(one, two) < 1e-6
    s1, s2 = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two"))
    for a, b in zip(s1, s2):
        assert a["updated"] and b["updated"] and a["tokens"] == b["tokens"]
        for k in ("loss", "grad_norm", "reward_mean", "exact_rate", "entropy_proxy", "kl",
                  "clip_fraction", "response_len"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    assert s1[0]["grad_norm"] > 1.0  # the clip was active: the global norm decided it


@pytest.mark.usefixtures("torch_kernels")
def test_srpo_mini_batches_on_two_ranks(tmp_path, one_thread):
    """mini_batches=2 on two ranks: each rank splits its own groups (rank 1 has one group of
    the first call, so its first mini-batch is a zero-weight placeholder; none of the second,
    whose single group makes one update everywhere); the ranks stay in step and the weights
    move."""
    run_ranks([functools.partial(srpo_updates, tmp_path, mini_batches=2)], timeout=180)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [s["updates"] for s in stats] == [2, 1]
    assert all(s["updated"] and np.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in stats)
    initial = __import__("test_srpo_step").setup(seed=0)[0].state_dict()
    moved = load_file(tmp_path / "model.safetensors")
    assert max_diff(moved, {k: initial[k] for k in moved}) > 1e-3


def _train_srpo(cfg):
    from gream_fast.train.srpo_loop import SRPOConfig
    from gream_fast.train.srpo_loop import train as srpo_train

    srpo_train(SRPOConfig(**cfg), progress=False)


@pytest.mark.usefixtures("torch_kernels")
def test_srpo_train_two_ranks(tmp_path):
    """`train srpo` on two ranks: rollouts on the gathered weights, per-rank prompts, rank 0
    alone writes metrics / checkpoints / best / final, and one process resumes its checkpoint."""
    from gream_fast.files import read_jsonl
    from gream_fast.model.tiny import build_tiny
    from gream_fast.train.srpo_loop import SRPOConfig
    from gream_fast.train.srpo_loop import train as srpo_train
    from test_srpo_loop import SHAPE

    data, index = make_data_and_index(tmp_path, users=30)
    build_tiny(tmp_path / "data", index, out_dir=tmp_path / "sft" / "final", seed=0,
               vocab_size=300, shape=SHAPE)
    run = tmp_path / "run"
    cfg = dict(model=str(tmp_path / "sft"), data=str(tmp_path / "data"),
               index=str(tmp_path / "index"), out=str(run), n=4, prompts_per_step=3,
               max_draws=2, lr=1e-3, warmup_steps=1, steps=2, save_every=1, eval_every=2,
               eval_users=3, device="cpu")
    run_ranks([functools.partial(_train_srpo, cfg)], timeout=240)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]  # one writer
    for m in metrics[1:]:
        assert 1 <= m["draws"] <= 2 and 0 <= m["kept_groups"] <= 3
        assert 0 <= m["rollout_reward_mean"] <= 1 and 0 <= m["kept_fraction"] <= 1
        if m["updated"]:
            assert 0 <= m["reward_mean"] <= 1 and np.isfinite(m["loss"]) and m["grad_norm"] >= 0
    assert "valid_recall@10" in metrics[0] and "valid_recall@10" in metrics[2]
    assert sorted(p.name for p in run.iterdir()) == [
        MARKER, "best", "checkpoint-1", "checkpoint-2", "final", "metrics.jsonl",
        "srpo_config.json"]
    record = json.loads((run / "best" / "best.json").read_text())
    assert record["step"] == metrics[2]["best_step"]
    start = load_file(tmp_path / "sft" / "final" / "model.safetensors")
    final = weights(run)
    assert final.keys() == start.keys()  # the single-process layout
    best = load_file(run / "best" / "model.safetensors")
    assert max_diff(best, start if record["step"] == 0 else final) == 0
    if any(m["updated"] for m in metrics[1:]):
        assert max_diff(final, start) > 0
    # one process resumes the two ranks' checkpoint-1 (model and sharded optimizer state)
    shutil.rmtree(run / "checkpoint-2")
    shutil.rmtree(run / "final")
    summary = srpo_train(SRPOConfig(**{**cfg, "resume": True}), progress=False)
    assert summary["steps"] == 2 and (run / "final" / "model.safetensors").is_file()
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]


def _evaluate_to(path, root, index, world_size):
    from gream_fast.data.dataset import Dataset
    from gream_fast.eval import evaluate
    from gream_fast.eval.cli import load_model
    from gream_fast.train.distributed import World

    model, tokenizer = load_model(root / "model", "cpu")
    world = World(rank=int(os.environ.get("RANK", 0)), size=world_size)
    data = Dataset.load(root / "data")
    # 7 users in batches of 2: 4 batches, so rank 0 evaluates 4 users and rank 1 three. Every
    # item is ranked: NDCG@all depends on each target's exact rank, a fingerprint of the rankings
    n = data.num_items
    out = {mode: evaluate(model, tokenizer, data, index, mode=mode, split="valid", ks=(1, 5, n),
                          num_beams=n, batch_size=2, max_users=7, think_budget=4,
                          progress=False, world=world)
           for mode in ("direct", "reasoning")}
    (path / f"rank{world.rank}.json").write_text(json.dumps(out))


def test_evaluate_two_ranks_match_one(tmp_path, one_thread):
    """evaluate(world=...) shares the users across ranks and every rank returns the metrics of
    all of them, equal to one process's (each batch, and its reasoning-mode seed, is the one a
    single process runs)."""
    from gream_fast.model.tiny import build_tiny
    from test_srpo_loop import SHAPE

    data, index = make_data_and_index(tmp_path, users=30)
    build_tiny(tmp_path / "data", index, out_dir=tmp_path / "model", seed=0, vocab_size=300,
               shape=SHAPE)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _evaluate_to(tmp_path / "one", tmp_path, index, 1)
    run_ranks([functools.partial(_evaluate_to, tmp_path / "two", tmp_path, index, 2)],
              timeout=240)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        assert json.loads((tmp_path / "two" / f"rank{rank}.json").read_text()) == one
    for m in one.values():
        assert 0 < m[f"ndcg@{data.num_items}"] < 1 and m[f"recall@{data.num_items}"] == 1
