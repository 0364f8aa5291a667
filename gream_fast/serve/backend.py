"""The model side of a server: a trained model, its index and tokenizer, the prompts it was
trained on, and one beam search per wave (what `gream-fast recommend` runs for one history).

Static batches (on CUDA by default): a KV pool sized at start-up for the largest wave the
engine forms (--max-batch-size prompts of --max-history items, --max-batch-rows beam rows),
direct-mode waves padded to a batch bucket (powers of two up to the limits) by repeating a
history, and one CUDA graph per (beams, bucket) captured at warm-up; after warm-up the runner
captures nothing more (the captures gauge stays flat): a shape without a graph runs eagerly and
counts in gream_decode_eager_steps. Reasoning-mode waves (thinking, then the answer) run outside
the pool, eagerly: rows leave one by one as they finish, shapes no warm-up could cover.
"""
import contextlib
import sys
from dataclasses import dataclass

import numpy as np


@dataclass
class BackendConfig:
    model: str
    index: str
    data: str = ""  # a `data prepare` folder: titles in the responses
    device: str = "auto"
    dtype: str = "auto"
    system_prompt: bool = True
    allow_index_mismatch: bool = False
    think_budget: int = 128  # reasoning mode: thinking tokens before <answer> is forced
    think_temperature: float = 0.0  # 0: greedy thinking, the same answer for the same history
    seed: int = 0
    warmup_beams: tuple = (10,)  # warm-up: one wave per beam count (and batch bucket)
    # the largest wave the engine forms: what the KV pool and the batch buckets are sized for
    max_history: int = 20
    max_batch_size: int = 32
    max_batch_rows: int = 1024
    static_batches: bool | None = None  # KV pool, buckets, CUDA graphs (None: on CUDA)


def batch_buckets(max_batch_size: int, max_batch_rows: int, beams: int) -> list:
    """The wave sizes a server runs at `beams` beams: powers of two below the largest wave the
    limits allow, and that wave."""
    top = min(max_batch_size, max_batch_rows // beams)
    return [b for b in (1 << i for i in range(top.bit_length())) if b < top] + [top]


class RecommenderBackend:
    """load() reads everything (errors name the flag and file); run() ranks a wave."""

    def __init__(self, cfg: BackendConfig, index=None):
        self.cfg = cfg
        self.index = index  # the SemanticIndex when already loaded (else from cfg.index)
        self.titles = self.model = self.runner = self.pool = None

    def load(self) -> None:
        from gream_fast.eval.cli import item_titles, load_model
        from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
        from gream_fast.model import make_runner
        from gream_fast.model.index_record import check_pairing
        from gream_fast.tasks.context import load_index

        cfg = self.cfg
        index = self.index if self.index is not None else load_index(cfg.index)
        check_pairing(cfg.model, index, index_name=f"--index {cfg.index}",
                      allow_mismatch=cfg.allow_index_mismatch)
        if cfg.data:
            self.titles = item_titles(cfg.data, index, cfg.index)
        self.model, self.tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
        static = cfg.static_batches
        if static is None:
            static = self.model.device.type == "cuda"
        self.runner = make_runner(self.model, cuda_graphs=static)
        self.prompts, self.constraints = {}, {}
        for mode in ("direct", "reasoning"):
            self.prompts[mode] = SeqRecPrompts(self.tokenizer, index, cfg.system_prompt,
                                               mode=mode)
            self.constraints[mode] = build_constraint(self.tokenizer, index, self.prompts[mode],
                                                      self.runner.device)
        self.index = index
        self.fingerprint = index.fingerprint()
        self.sids = [list(index.sid(i)) for i in range(index.num_items)]
        if static and hasattr(self.runner, "reserve"):  # HFRunner: no static decode step
            self.pool = self.runner.reserve(cfg.max_batch_size, self.longest_prompt(),
                                            cfg.max_batch_rows, self.constraints["direct"].max_len)

    def longest_prompt(self) -> int:
        """Tokens of the longest direct-mode prompt: a full window of the item with the most
        SID tokens (a longer real one only makes its wave run outside the pool, eagerly)."""
        from gream_fast.generate.recommend import encode_prompts

        item = max(range(len(self.sids)), key=lambda i: len(self.sids[i]))
        text = self.prompts["direct"]([item] * self.cfg.max_history)
        return len(encode_prompts(self.tokenizer, [text])[0])

    def buckets(self, beams: int) -> list:
        """The wave sizes of `beams` beams that static batches run (batch_buckets)."""
        return batch_buckets(self.cfg.max_batch_size, self.cfg.max_batch_rows, beams)

    def warmup(self) -> None:
        """One wave per beam count (per batch bucket with static batches: the CUDA graphs are
        captured here), and each other path once (kernels compiled, caches and allocator warm
        before the first request); then no more captures."""
        cfg = self.cfg
        for beams in cfg.warmup_beams:
            for b in self.buckets(beams) if self.pool is not None else [1]:
                self.run([[0]] * b, "direct", beams, "full")
        beams = cfg.warmup_beams[0]
        self.run([[0]], "direct", beams, "sid")
        self.run([[0]], "reasoning", beams, "full")
        if self.pool is not None:
            self.runner.freeze()

    @property
    def graph_captures(self) -> int:
        return getattr(self.runner, "graph_captures", 0) if self.runner is not None else 0

    @property
    def kv_pool(self) -> dict | None:
        """What /v1/info says of the KV pool (None without static batches)."""
        pool = self.pool
        return None if pool is None else {
            "bytes": pool.nbytes(), "prompts": pool.prompts, "prompt_len": pool.prompt_len,
            "rows": pool.rows, "suffix_capacity": pool.suffix_capacity, "misses": pool.misses,
            "batch_buckets": {b: self.buckets(b) for b in self.cfg.warmup_beams}}

    @property
    def eager_steps(self) -> int:
        return getattr(self.runner, "eager_steps", 0) if self.runner is not None else 0

    @property
    def device(self) -> str:
        return str(self.runner.device) if self.runner is not None else self.cfg.device

    def run(self, histories, mode: str, num_beams: int, score: str):
        """Each history's num_beams items, best first, and their scores: arrays [B, beams]."""
        from gream_fast.generate import reason_and_recommend, recommend

        texts = [self.prompts[mode](h) for h in histories]
        con = self.constraints[mode]
        if mode == "direct":
            b = len(texts)
            if self.pool is not None:  # pad to the wave's bucket: the shape a graph was made for
                texts += texts[-1:] * (next((s for s in self.buckets(num_beams) if s >= b), b) - b)
            # with the pool: one beam search per wave (the pool holds its KV already; a wave
            # split by free memory would run shapes warm-up never captured)
            items, scores = recommend(self.model, self.tokenizer, con, texts,
                                      num_beams=num_beams, top_k=num_beams, score=score,
                                      runner=self.runner,
                                      memory_budget=None if self.pool is None else sys.maxsize)
            items, scores = items[:b], scores[:b]
        else:
            with self.runner.eager() if self.pool is not None else contextlib.nullcontext():
                res = reason_and_recommend(self.model, self.tokenizer, con, texts,
                                           self.cfg.think_budget, self.cfg.think_temperature,
                                           1.0, num_beams, num_beams, score, self.cfg.seed,
                                           runner=self.runner, end_token_id=con.eos_token_id)
            items, scores = res.items, res.scores
        return items.cpu().numpy(), scores.float().cpu().numpy().astype(np.float64)
