"""The SRPO loop (METHOD.md section 5): `gream-fast train srpo`.

Instances are the CoT samples' (METHOD.md section 4, gream_fast.tasks.reason): every training
target at positions FIRST_TARGET .. len(seq) - 3 of a user's sequence, with the last
`max_history` items before it as history. They are shuffled with the seed (a fresh permutation
per pass over them) and consumed `prompts_per_step` at a time; the data position of step s is
s x prompts_per_step, so a resumed run needs only the step. Each prompt is the user's history
formatted as the seqrec chat prompt that SFT and evaluation use (gream_fast.eval.SeqRecPrompts),
and rollouts are constrained to the SID trie ending with the chat template's end-of-turn token
(build_constraint). With --mode reasoning the prompt is the CoT rows' (tasks.reason), a response
thinks in free text (at most --think-budget tokens, then `<answer>` is forced), then names a SID
under the trie closed by `</answer>`'s first token; its reward is 0 without a `<think>` ...
`</think>` block and a SID answer (train.rewards.gated_sid_reward), and validation runs in
reasoning mode too. One step is train.srpo.srpo_step; its rollout seeds derive from (seed, step).

The policy starts from `--model` (an SFT run folder: its final/, else its newest checkpoint; or
any HF model folder whose tokenizer has the SID tokens); the frozen reference model is a copy of
that starting policy. AdamW (no decay on norms and biases), linear warm-up then a constant lr.

A run directory holds (checkpoints as in train.sft, format "gream-fast-srpo"):
  srpo_config.json     the resolved config
  metrics.jsonl        one line per step: step, lr, srpo_step's statistics (the rollouts
                       before the selection: rollout_reward_mean, rollout_exact_rate over the
                       first draw, kept_fraction, distinct_items; the kept groups: reward_mean,
                       exact_rate, kept_groups, draws; loss, kl, clip fractions, entropy_proxy,
                       response_len, tokens, grad_norm, rollout_s / scoring_s / update_s),
                       step_time_s, tokens_per_s, elapsed_s; with --eval-every, valid_recall@K /
                       valid_ndcg@K (K = 1, 5, 10, 20: 20 beams) and valid_distinct_top1 (the
                       distinct items ranked first) on the first --eval-users validation users
                       (a step-0 line holds the starting policy's); under torchrun the
                       statistics are all ranks' together (kept_groups and tokens summed,
                       draws the most any rank drew, the means over all their responses and
                       tokens)
  checkpoint-STEP/     every `save_every` steps and at the end (atomic, exact resume)
  final/               the last model + tokenizer
  best/                with --eval-every: the evaluated policy (the starting one included) with
                       the highest validation Recall@10 (ties: NDCG@10, then the earlier step),
                       and best/best.json saying which step it is. RL on a small model can lower
                       validation recall; best/ never holds a policy worse than the start on it.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from gream_fast.config import check_ranges
from gream_fast.errors import FormatError, InvalidInputError
from gream_fast.files import check_output, claim_dir
from gream_fast.model.index_record import INDEX_MISMATCH_HELP
from gream_fast.train.sft import RUN_HELP

STATE_FORMAT = "gream-fast-srpo"
MODES = ("direct", "reasoning")
# as SFT's (train.sft.RESUMABLE), but --model is the frozen reference: it must stay the same
RESUMABLE = {"resume", "save_every", "keep_checkpoints", "stop_after", "device", "out", "data",
             "index", "allow_index_mismatch", "token_budget", "gradient_checkpointing"}


@dataclass
class SRPOConfig:
    model: str = ""
    data: str = ""
    index: str = ""
    out: str = ""
    mode: str = "direct"
    think_budget: int = 512
    score: str = "full"
    steps: int = 150
    prompts_per_step: int = 256
    n: int = 10
    lr: float = 2e-6
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta: float = 0.001
    clip_grad: float = 1.0
    temperature: float = 1.0
    max_draws: int = 10
    mini_batches: int = 1
    prompts: str = "all"
    rollout: str = "sample"
    credit: str = "response"
    reward: str = "residual"
    max_history: int = 20
    save_every: int = 50
    keep_checkpoints: int = 2
    stop_after: int = 0
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    eval_every: int = 0
    eval_users: int = 200
    best_metric: str = "recall@10"
    bf16: bool = True
    token_budget: int = 0
    gradient_checkpointing: bool = False
    allow_index_mismatch: bool = False


HELP = {
    "model": "the starting policy: an SFT run folder (its final/, else its newest checkpoint) or "
             "a Hugging Face model folder whose tokenizer has the SID tokens",
    "data": "the `data prepare` folder (training instances: the CoT samples' targets)",
    "index": "the index folder or file (the SIDs the rollouts are constrained to)",
    "out": "run folder: srpo_config.json, metrics.jsonl, checkpoint-STEP/, final/",
    "mode": "direct: a response is a SID; reasoning: the CoT prompt, a response thinks in free "
            "text until <answer>, then names a SID and </answer> (reward 0 without a "
            "<think>...</think> block and a SID answer)",
    "think_budget": "reasoning mode: free-text tokens per response before <answer> is forced",
    "score": "log-prob normalisation of the policy loss: full vocabulary (exact), or sid: over "
             "the SID level's LM-head rows only (kernels.sid_logprob; far less memory)",
    "steps": "optimizer steps",
    "prompts_per_step": "prompts (groups) per step",
    "n": "responses sampled per prompt",
    "lr": "AdamW learning rate (constant after the warm-up)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (not on norms and biases)",
    "beta": "weight of the k3 KL to the frozen starting policy",
    "clip_grad": "max gradient norm",
    "temperature": "rollout sampling temperature",
    "max_draws": "rollout batches drawn at most per step to fill the groups (dynamic sampling)",
    "max_history": "history items per prompt (the most recent)",
    **RUN_HELP,
    "seed": "shuffling and rollout seed",
    "eval_every": "Recall/NDCG on validation users every N steps, at step 0 and at the end (0: "
                  "never)",
    "eval_users": "validation users evaluated (the first ones; 0: all)",
    "bf16": "bfloat16 autocast of the log-prob passes on CUDA (float32 master weights); CPU "
            "always runs float32",
    "token_budget": "tokens per packed log-prob pass (0: the step's groups in one pass); the "
                    "passes' gradients add up to the step's, so a budget bounds memory only "
                    "(reasoning mode at the reference's lengths: e.g. 32768)",
    "gradient_checkpointing": "recompute the policy's layer activations in the backward",
    "rollout": "direct mode's rollouts: sample (n SIDs sampled at --temperature) or beam "
               "(the n best distinct items by the trie-constrained beam search)",
    "reward": "residual (METHOD.md), or residual + rank with --rollout beam: in a group that "
              "holds the target, a wrong item loses more the higher the policy ranks it",
    "credit": "the advantage: per response (METHOD.md), or per SID level (direct mode: a "
              "token is credited for matching the target up to its level, so a wrong item's "
              "later tokens are not paid for its right cluster)",
    "prompts": "RL prompts: all (every training position of every user) or last-K (each "
               "user's last K training positions: every user weighs about the same)",
    "mini_batches": "optimizer steps per rollout batch, each on its share of the groups, "
                    "clipped against the rollout policy's log-probs (the reference: 4; 1: the "
                    "ratio stays 1 and the clip never acts)",
    "allow_index_mismatch": INDEX_MISMATCH_HELP,
    "best_metric": "with --eval-every: best/ keeps the policy with the highest validation value "
                   "of this metric (recall@K or ndcg@K; ties: ndcg@10, then the earlier step)",
}


# -- configuration ----------------------------------------------------------------------------
def check_config(cfg: SRPOConfig) -> SRPOConfig:
    """Validate `cfg` before anything is loaded."""
    from gream_fast.train.srpo import check_variants

    if cfg.mode not in MODES:
        raise InvalidInputError(f"--mode: expected one of {', '.join(MODES)}, got {cfg.mode!r}")
    for name in ("model", "data", "index", "out"):
        if not getattr(cfg, name):
            raise InvalidInputError(f"--{name}: required")
    if not Path(cfg.model).is_dir():
        raise InvalidInputError(f"--model {cfg.model}: no such folder")
    if not Path(cfg.data).is_dir():
        raise InvalidInputError(f"--data {cfg.data}: no such folder (a `data prepare` output)")
    if not Path(cfg.index).exists():
        raise InvalidInputError(f"--index {cfg.index}: no such file or folder")
    check_ranges(cfg, at_least={"steps": 1, "prompts_per_step": 1, "n": 1, "max_draws": 1,
                                "mini_batches": 1,
                                "max_history": 1, "eval_users": 0, "think_budget": 0,
                                "token_budget": 0,
                                **dict.fromkeys(("warmup_steps", "weight_decay", "beta",
                                                 "clip_grad", "save_every", "keep_checkpoints",
                                                 "stop_after", "eval_every"), 0)},
                 positive=("lr", "temperature"))
    check_output(cfg.out, **run_folder(cfg))
    prompts_last(cfg.prompts)
    check_variants(cfg, "--")
    name, _, k = cfg.best_metric.partition("@")
    if name not in ("recall", "ndcg") or k not in ("1", "5", "10"):
        raise InvalidInputError(f"--best-metric: expected recall@K or ndcg@K with K in 1, 5, 10, "
                                f"got {cfg.best_metric!r}")
    return cfg


def run_folder(cfg: SRPOConfig) -> dict:
    """check_output / claim_dir's arguments for the run folder --out."""
    return dict(command="train srpo", inputs=[cfg.data, cfg.model, cfg.index],
                known=("srpo_config.json",))


def model_dir(path) -> Path:
    """The HF model folder of `path`: itself, an SFT/SRPO run's final/, or its newest checkpoint."""
    from gream_fast.train.sft import _checkpoints

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "final" / "config.json").is_file():
        return p / "final"
    found = _checkpoints(p)
    if found:
        return found[-1][1]
    raise FormatError(f"--model {p}: neither a Hugging Face model folder (no config.json) nor a "
                      "training run (no final/ or checkpoint-STEP/)")


def load_policy(path, index, device, allow_index_mismatch: bool = False):
    """(model, tokenizer) on `device`, checking the tokenizer has the SID tokens of `index` and
    the model was trained with `index` (model.index_record); the index is recorded in it."""
    from gream_fast.index.tokens import sid_token_table
    from gream_fast.model.index_record import attach, check_pairing
    from gream_fast.train.sft import load_pretrained

    model, tokenizer = load_pretrained(path, device)
    try:
        sid_token_table(tokenizer, index)
    except InvalidInputError as e:
        raise InvalidInputError(f"--model {path}: {e} (SRPO starts from an SFT'd model whose "
                                "tokenizer has the SID tokens)") from None
    check_pairing(model, index, allow_mismatch=allow_index_mismatch)
    attach(model, index)
    return model.to(device), tokenizer


# -- data -------------------------------------------------------------------------------------
class Instances:
    """The RL instances (the CoT samples', tasks.reason: every training position, or with
    last > 0 each user's last `last`, so that long users do not dominate) and their seeded
    order."""

    def __init__(self, dataset, max_history: int, seed: int, last: int = 0):
        from gream_fast.tasks.reason import FIRST_TARGET

        self.examples = dataset.examples(first=FIRST_TARGET, last_offset=2,
                                         max_history=max_history, last=last)
        if len(self.examples) == 0:
            raise InvalidInputError(f"the dataset has no training targets at position >= "
                                    f"{FIRST_TARGET}: no SRPO instances")
        self.seed = seed
        self._perm = {}

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self))}
        return self._perm[epoch]

    def batch(self, start: int, size: int) -> list:
        """Instance ids at positions start .. start + size - 1 of the endless shuffled order."""
        e = len(self)
        return [int(self.order(q // e)[q % e]) for q in range(start, start + size)]


def prompts_last(value: str) -> int:
    """--prompts as the number of last positions per user (0: all)."""
    if value == "all":
        return 0
    name, _, k = value.partition("-")
    if name != "last" or not k.isdigit() or int(k) < 1:
        raise InvalidInputError(f"--prompts: expected all or last-K with K >= 1 (e.g. last-3), "
                                f"got {value!r}")
    return int(k)


def think_format(tokenizer, prompts):
    """Reasoning mode's markers (train.rewards.ThinkFormat); a turn ends at the tokenizer's EOS
    or the chat template's end of turn (then the marker replaces it)."""
    from gream_fast.train.rewards import ThinkFormat

    stop = {t for t in (tokenizer.eos_token_id, prompts.encoder.eot_id) if t is not None}
    return ThinkFormat.from_tokenizer(tokenizer, stop=sorted(stop))


def step_seed(seed: int, step: int, rank: tuple = ()) -> int:
    """The rollout seed of a step; rank: (rank,) in a sharded run (each rank draws its own
    rollouts), empty in one process."""
    return int(np.random.default_rng([seed, step, 7, *rank]).integers(2 ** 31))


# -- the loop ---------------------------------------------------------------------------------
def _evaluate(policy, tokenizer, dataset, constraint, cfg: SRPOConfig, world=None) -> dict:
    """Validation: Recall / NDCG at 1, 5, 10 and 20 (20 beams), and distinct_top1, how many
    different items the users' first recommendations are (a policy collapsing onto a few
    popular items shows here before Recall moves)."""
    from gream_fast.eval import recall_ndcg
    from gream_fast.eval.evaluate import rank_users

    beams = min(20, dataset.num_items)
    ks = tuple(k for k in (1, 5, 10, 20) if k <= beams)
    was = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            r = rank_users(policy, tokenizer, dataset, constraint, mode=cfg.mode, split="valid",
                           num_beams=beams, max_users=cfg.eval_users,
                           max_history=cfg.max_history, progress=False,
                           think_budget=cfg.think_budget, seed=cfg.seed, world=world)
    finally:
        policy.train(was)
    m = {**recall_ndcg(r.items, r.targets, ks), "distinct_top1": len(np.unique(r.items[:, 0]))}
    return {f"valid_{k}": v for k, v in m.items()}


def _rank_key(metrics: dict, best_metric: str) -> tuple:
    """Order of policies for best/: the chosen validation metric, then NDCG@10."""
    return (metrics[f"valid_{best_metric}"], metrics.get("valid_ndcg@10", 0.0))


class BestPolicy:
    """best/ of a run: the evaluated policy with the highest validation metric so far. A later
    step replaces it only when strictly better, so ties keep the earlier (closer to the start)
    policy. best/best.json (step + metrics) carries the record across --resume."""

    def __init__(self, run_dir: Path, metric: str):
        self.path, self.metric = run_dir / "best", metric
        record = self.path / "best.json"
        self.record = json.loads(record.read_text()) if record.is_file() else None

    def better(self, metrics: dict) -> bool:
        return self.record is None or \
            _rank_key(metrics, self.metric) > _rank_key(self.record["metrics"], self.metric)

    def save(self, step: int, metrics: dict, policy, tokenizer, state: dict | None = None):
        """state: the full model state of a sharded policy (train.distributed)."""
        from gream_fast.files import atomic_dir
        from gream_fast.train.sft import save_model

        self.record = {"step": step, "metric": self.metric, "metrics": metrics}
        with atomic_dir(self.path) as tmp:
            save_model(policy, tokenizer, tmp, state)
            (tmp / "best.json").write_text(json.dumps(self.record, indent=2) + "\n")

    def offer(self, step: int, metrics: dict, policy, tokenizer) -> bool:
        if not self.better(metrics):
            return False
        self.save(step, metrics, policy, tokenizer)
        return True


def _evaluate_and_offer(step, policy, root, world, tokenizer, dataset, constraint, cfg, best):
    """(validation metrics, best/'s step) on rank 0; ({}, None) on the others. The ranks share
    the validation users on whole weights (distributed.gathered); whether best/ takes the
    policy is rank 0's call, summed over the ranks (the others add 0) so that every rank joins
    the gather of its state."""
    from gream_fast.train import distributed

    with distributed.gathered(root, world):
        metrics = _evaluate(policy, tokenizer, dataset, constraint, cfg, world)
    better = torch.tensor([float(world.is_main and best.better(metrics))])
    if distributed.all_reduce(better, world).item():
        full = distributed.full_model_state(policy, world)
        if world.is_main:
            best.save(step, metrics, policy, tokenizer, full)
        distributed.barrier(world)
    return (metrics, best.record["step"]) if world.is_main else ({}, None)


def train(cfg: SRPOConfig, progress: bool = True) -> dict:
    """Run (or resume) SRPO as configured; returns a summary (steps, final path, last reward,
    seconds).

    Under `torchrun --nproc-per-node G` (train.distributed): the policy is sharded with FSDP2
    (the frozen reference stays whole on each rank: forward only), each rank takes a
    contiguous share of a step's prompts and wants that many groups, with its own rollout seed
    and dynamic-sampling draws keyed by its rank; rollouts and evaluation run on the gathered
    weights. The loss is normalised by the step's global response-token count, so the update
    is the single-process one on the same groups up to float summation order; a step is
    skipped only when no rank kept a group. The ranks share the validation users (the metrics
    equal one process's); rank 0 alone writes the metrics, checkpoints, best/ and final/ (the
    single-process format: a run resumes with another number of processes)."""
    from gream_fast.train import distributed

    return distributed.launch(_train, check_config(cfg), progress)


def _train(cfg: SRPOConfig, progress: bool, world, device) -> dict:
    from tqdm.auto import tqdm

    from gream_fast.data.dataset import Dataset
    from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
    from gream_fast.files import atomic_dir, write_json
    from gream_fast.model.runner import supports
    from gream_fast.tasks.context import load_index
    from gream_fast.train import distributed
    from gream_fast.train.sft import (_check_resume_config, _truncate_metrics, lr_factor,
                                      make_optimizer, restore_optimizer, restore_rng,
                                      resume_point, save_checkpoint, save_model)
    from gream_fast.train.srpo import SRPOStepConfig, response_logprobs, srpo_step
    from gream_fast.train.srpo_loss import SRPOLossConfig

    if cfg.prompts_per_step < world.size:
        raise InvalidInputError(f"--prompts-per-step: {cfg.prompts_per_step} prompts cannot be "
                                f"shared by {world.size} processes (expected >= the world size)")
    run_dir = Path(cfg.out)
    resume_from, state = resume_point(run_dir, cfg.resume, STATE_FORMAT)
    start_dir = model_dir(cfg.model)
    dataset = Dataset.load(cfg.data)
    index = load_index(cfg.index)
    if index.num_items != dataset.num_items:
        raise InvalidInputError(f"--index {cfg.index} has {index.num_items} items but --data "
                                f"{cfg.data} {dataset.num_items}: they must describe the same items")
    instances = Instances(dataset, cfg.max_history, cfg.seed, prompts_last(cfg.prompts))
    data_stats = {"instances": len(instances), "items": dataset.num_items}
    torch.manual_seed(cfg.seed)

    ref, tokenizer = load_policy(start_dir, index, device, cfg.allow_index_mismatch)
    if resume_from is not None:
        _check_resume_config(state["config"], cfg, resume_from, RESUMABLE)
        if state["data"] != data_stats:
            raise InvalidInputError(f"--resume: --data {cfg.data} now gives {data_stats}, the run "
                                    f"in {resume_from} was trained on {state['data']}")
        policy, tokenizer = load_policy(resume_from, index, device)
    else:
        policy = copy.deepcopy(ref)
    if world.distributed and not supports(policy):
        raise InvalidInputError(f"--model {start_dir}: model_type {policy.config.model_type!r}; "
                                "under torchrun the rollouts need the decoder runner's "
                                "architectures (llama, qwen2, qwen3)")
    ref.eval().requires_grad_(False)
    policy.train()
    # after the reference copy: it stays whole (forward only, no gradients)
    root = distributed.shard_model(policy, world, response_logprobs)

    prompts = SeqRecPrompts(tokenizer, index, mode=cfg.mode)
    constraint = build_constraint(tokenizer, index, prompts, device)
    fmt = think_format(tokenizer, prompts) if cfg.mode == "reasoning" else None
    optimizer = make_optimizer(policy, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, min_ratio=1.0))
    step = 0
    if state is not None:
        restore_optimizer(resume_from, state, optimizer, scheduler,
                          load=lambda sd: distributed.load_optimizer_state(policy, optimizer, sd,
                                                                           world))
        restore_rng(resume_from)
        step = state["step"]
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:
        claim_dir(run_dir, **run_folder(cfg))
        write_json(run_dir / "srpo_config.json", {**asdict(cfg), "start_model": str(start_dir),
                                                  "data_stats": data_stats})
        _truncate_metrics(metrics_path, step)
    mine = distributed.share(cfg.prompts_per_step, world)  # this rank's prompts of a step
    rank_key = (world.rank,) if world.distributed else ()

    step_cfg = SRPOStepConfig(n=cfg.n, temperature=cfg.temperature, groups=len(mine),
                              max_draws=cfg.max_draws, clip_grad=cfg.clip_grad,
                              loss=SRPOLossConfig(beta=cfg.beta), score=cfg.score,
                              mode=cfg.mode, think_budget=cfg.think_budget,
                              rollout=cfg.rollout, credit=cfg.credit, reward=cfg.reward,
                              bf16=cfg.bf16 and device.type == "cuda",
                              token_budget=cfg.token_budget, mini_batches=cfg.mini_batches,
                              checkpointing=cfg.gradient_checkpointing)
    stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    evaluating = cfg.eval_every > 0
    best = BestPolicy(run_dir, cfg.best_metric) if evaluating else None
    started, last = time.perf_counter(), {}
    bar = tqdm(total=cfg.steps, initial=step, desc="srpo", unit="step", disable=not progress)
    evaluate = partial(_evaluate_and_offer, policy=policy, root=root, world=world,
                       tokenizer=tokenizer, dataset=dataset, constraint=constraint, cfg=cfg,
                       best=best)
    with open(metrics_path if world.is_main else os.devnull, "a") as log:
        if evaluating and step == 0:
            first, _ = evaluate(0)
            log.write(json.dumps({"step": 0, **first}) + "\n")
            log.flush()
        while step < stop:
            t0 = time.perf_counter()
            def encoded(ids):
                return ([tokenizer(prompts(instances.examples[i][1]),
                                   add_special_tokens=False)["input_ids"] for i in ids],
                        [int(instances.examples.target[i]) for i in ids])

            def more(draw, step=step):  # dynamic sampling's extra batches: fresh instances,
                # seeded by (step, draw, and the rank in a sharded run)
                rng = np.random.default_rng([cfg.seed, step, draw, *rank_key])
                size = min(len(mine), len(instances))
                return encoded(rng.choice(len(instances), size, replace=False).tolist())

            ids = instances.batch(step * cfg.prompts_per_step, cfg.prompts_per_step)
            batch, targets = encoded(ids[mine.start:mine.stop])
            lr = optimizer.param_groups[0]["lr"]
            stats = srpo_step(policy, ref, optimizer, batch, targets, constraint, step_cfg,
                              seed=step_seed(cfg.seed, step, rank_key), more=more,
                              tokenizer=tokenizer, fmt=fmt, logprob_fn=root, world=world)
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - t0
            last = {"step": step, "lr": lr, **stats, "step_time_s": seconds,
                    "tokens_per_s": stats.get("tokens", 0) / seconds,
                    "elapsed_s": time.perf_counter() - started}
            if evaluating and (step % cfg.eval_every == 0 or step == cfg.steps):
                valid, best_step = evaluate(step)
                last.update(valid, best_step=best_step)
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(reward=f"{stats['rollout_reward_mean']:.3f}",
                            kept=f"{stats['kept_fraction']:.2f}", s=f"{seconds:.1f}")
            if step == stop or (cfg.save_every and step % cfg.save_every == 0):
                # collectives: every rank gathers, rank 0 writes
                full = distributed.full_model_state(policy, world)
                opt_state = distributed.full_optimizer_state(policy, optimizer, world)
                if world.is_main:
                    save_checkpoint(run_dir, policy, tokenizer, optimizer, scheduler, {
                        "step": step, "prompts_seen": step * cfg.prompts_per_step,
                        "total_steps": cfg.steps, "config": asdict(cfg), "data": data_stats},
                        cfg.keep_checkpoints, fmt=STATE_FORMAT, model_state=full,
                        opt_state=opt_state)
                distributed.barrier(world)
    bar.close()
    final = None
    if step == cfg.steps:
        final = run_dir / "final"
        full = distributed.full_model_state(policy, world)
        if world.is_main:
            with atomic_dir(final) as tmp:
                save_model(policy, tokenizer, tmp, full)
        distributed.barrier(world)
    return {"steps": step, "total_steps": cfg.steps, "final": str(final) if final else None,
            "reward_mean": last.get("reward_mean"), "exact_rate": last.get("exact_rate"),
            **{k: v for k, v in last.items() if k.startswith("valid_")},
            "best": ({"path": str(best.path), **best.record} if best and best.record else None),
            "seconds": round(time.perf_counter() - started, 3), "data": data_stats}
