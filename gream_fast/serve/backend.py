"""The model side of a server: a trained model, its index and tokenizer, the prompts it was
trained on, and one beam search per wave (what `gream-fast recommend` runs for one history)."""
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
    warmup_beams: tuple = (10,)  # warm-up: one wave per beam count


class RecommenderBackend:
    """load() reads everything (errors name the flag and file); run() ranks a wave."""

    def __init__(self, cfg: BackendConfig, index=None):
        self.cfg = cfg
        self.index = index  # the SemanticIndex when already loaded (else from cfg.index)
        self.titles = self.model = self.runner = None

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
        self.runner = make_runner(self.model)
        self.prompts, self.constraints = {}, {}
        for mode in ("direct", "reasoning"):
            self.prompts[mode] = SeqRecPrompts(self.tokenizer, index, cfg.system_prompt,
                                               mode=mode)
            self.constraints[mode] = build_constraint(self.tokenizer, index, self.prompts[mode],
                                                      self.runner.device)
        self.index = index
        self.fingerprint = index.fingerprint()
        self.sids = [list(index.sid(i)) for i in range(index.num_items)]

    def warmup(self) -> None:
        """One wave per beam count, and each other path once (kernels compiled, caches and
        allocator warm before the first request)."""
        for beams in self.cfg.warmup_beams:
            self.run([[0]], "direct", beams, "full")
        beams = self.cfg.warmup_beams[0]
        self.run([[0]], "direct", beams, "sid")
        self.run([[0]], "reasoning", beams, "full")

    @property
    def graph_captures(self) -> int:
        return getattr(self.runner, "graph_captures", 0) if self.runner is not None else 0

    @property
    def device(self) -> str:
        return str(self.runner.device) if self.runner is not None else self.cfg.device

    def run(self, histories, mode: str, num_beams: int, score: str):
        """Each history's num_beams items, best first, and their scores: arrays [B, beams]."""
        from gream_fast.generate import reason_and_recommend, recommend

        texts = [self.prompts[mode](h) for h in histories]
        con = self.constraints[mode]
        if mode == "direct":
            items, scores = recommend(self.model, self.tokenizer, con, texts,
                                      num_beams=num_beams, top_k=num_beams, score=score,
                                      runner=self.runner)
        else:
            res = reason_and_recommend(self.model, self.tokenizer, con, texts,
                                       self.cfg.think_budget, self.cfg.think_temperature, 1.0,
                                       num_beams, num_beams, score, self.cfg.seed,
                                       runner=self.runner, end_token_id=con.eos_token_id)
            items, scores = res.items, res.scores
        return items.cpu().numpy(), scores.float().cpu().numpy().astype(np.float64)
