"""gream-fast inside TRL's GRPOTrainer: trie-constrained rollouts, the residual-sensitive reward
from token ids, SRPO's bonus-calibrated group advantage and its loss settings.

    from gream_fast.integrations.trl import (SRPOGRPOTrainer, gream_rollout_func,
                                             sid_reward_func, srpo_grpo_config)
    trainer = SRPOGRPOTrainer(model=model_dir, args=srpo_grpo_config(output_dir="runs/trl"),
                              train_dataset=data,  # columns "prompt" and "target" (item id)
                              processing_class=tokenizer,
                              reward_funcs=sid_reward_func(constraint),
                              rollout_func=gream_rollout_func(constraint, tokenizer))

How each piece plugs into TRL (1.16):
- gream_rollout_func is GRPOTrainer's `rollout_func` (honoured with use_vllm=False). TRL hands
  it this process's prompts already repeated num_generations times in a row (under several
  processes a group may be split across two of them), so the rollout serves each run of equal
  prompts from one prefill, whatever its length, and returns the completions in TRL's order.
  Its log-probs are log-softmax(logits / temperature) over the full vocabulary, the quantity
  TRL recomputes.
- sid_reward_func / gated_reward_func are reward callables on `completion_ids`: SID tokens are
  special tokens, so the decoded `completions` TRL also passes are empty strings.
- TRL has no advantage hook: SRPOGRPOTrainer keeps the gathered rewards TRL computes
  (`_calculate_rewards`) and replaces the advantages of `_generate_and_score_completions` with
  kernels.group_advantage. Both are private methods, so the trainer refuses a TRL outside the
  tested range instead of failing silently.
- srpo_grpo_config: SRPO's loss in TRL's terms: loss_type "dapo" (token mean over the batch),
  epsilon 0.2, delta 10 (TRL's two-sided clip, for A < 0 the same as SRPO's dual clip at 10),
  beta 0.001 (TRL's k3 KL, without SRPO's clamps at +-20 / +-10). TRL has no dynamic
  sampling; SRPOGRPOTrainer can drop zero-variance groups from the loss normaliser instead,
  which gives the loss SRPO computes on the groups it keeps.
"""
import time

import torch
import trl
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from gream_fast.errors import GreamError, InvalidInputError
from gream_fast.generate import sample
from gream_fast.integrations.core import (check_mode, check_tokenizer, completion_rewards,
                                          prompt_runs)
from gream_fast.kernels import group_advantage
from gream_fast.model.index_record import check_pairing
from gream_fast.model.runner import make_runner
from gream_fast.train.rewards import ThinkFormat

TESTED = (Version("1.16.0"), Version("1.17.0"))  # [low, high): the private API used here


def check_trl_version(version: str | None = None) -> None:
    """GreamError unless the installed TRL is one this adapter was tested with."""
    v = Version(version or trl.__version__)
    if not TESTED[0] <= v < TESTED[1]:
        raise GreamError(f"gream_fast.integrations.trl supports trl >= {TESTED[0]}, < "
                         f"{TESTED[1]} (it overrides GRPOTrainer's private methods); trl {v} is "
                         f"installed: pip install 'trl>={TESTED[0]},<{TESTED[1]}'")


def _reward_func(name, constraint, target_key, mode, fmt, on_invalid):
    def reward(prompts=None, completions=None, completion_ids=None, log_metric=None, **kwargs):
        if completion_ids is None:
            raise InvalidInputError(f"{name}: TRL passed no completion_ids")
        res = completion_rewards(completion_ids, kwargs.get(target_key), constraint, mode=mode,
                                 fmt=fmt, sid_start=kwargs.get("sid_start"),
                                 on_invalid=on_invalid)
        if log_metric is not None and len(res.reward):
            log_metric(f"{name}/exact", float((res.reward == 1.0).mean()))
            log_metric(f"{name}/valid", float(res.valid.mean()))
        return res.reward.tolist()

    reward.__name__ = name  # TRL logs rewards/<name>
    reward.gream_constraint, reward.gream_mode = constraint, mode  # checked by SRPOGRPOTrainer
    return reward


def sid_reward_func(constraint, *, target_key: str = "target", on_invalid: str = "raise"):
    """A TRL reward callable: the residual-sensitive reward of each completion (SID tokens and
    EOS) for its target item, read from the dataset column `target_key` (an item id). A
    completion that is not a SID raises (on_invalid="raise": gream_rollout_func never makes
    one) or scores 0 (on_invalid="zero", for unconstrained generation)."""
    return _reward_func("sid_reward", constraint, target_key, "direct", None, on_invalid)


def gated_reward_func(constraint, tokenizer=None, *, fmt: ThinkFormat | None = None,
                      target_key: str = "target"):
    """The reasoning-mode reward callable: 0 unless the completion has a think block and an
    answer of SID tokens closed by the constraint's end token, else the residual-sensitive
    reward of the answer. The answer starts where gream_rollout_func says (its `sid_start`
    field), else after the first answer marker in the ids. fmt: the markers' ids (default:
    ThinkFormat.from_tokenizer(tokenizer))."""
    if fmt is None:
        if tokenizer is None:
            raise InvalidInputError("gated_reward_func: pass the tokenizer or fmt")
        fmt = ThinkFormat.from_tokenizer(tokenizer)
    return _reward_func("gated_sid_reward", constraint, target_key, "reasoning", fmt, "raise")


def gream_rollout_func(constraint, tokenizer, *, mode: str = "direct",
                       temperature: float | None = None, top_p: float = 1.0,
                       think_budget: int = 512, seed: int = 0):
    """TRL's `rollout_func` on gream-fast's engine: every completion a real item.

    direct: each completion is a SID sampled under the trie, then EOS. reasoning: free text
    until the answer marker (forced when think_budget runs out), then a SID under the trie
    and the end token (the first token of "</answer>", which must be the constraint's).
    Sampling runs at the trainer's temperature (or `temperature`) and top_p; the returned
    log-probs are the policy's at that temperature over the full vocabulary. Extra fields for
    the reward functions: "item" (the item each completion names) and, in reasoning mode,
    "sid_start" (where its SID starts). Seeds differ by call and by process."""
    check_trl_version()
    check_mode(mode)
    check_tokenizer(constraint, tokenizer, mode=mode, who="gream_rollout_func")
    fmt = ThinkFormat.from_tokenizer(tokenizer) if mode == "reasoning" else None
    calls = [0]

    def rollout(prompts, trainer):
        temp = trainer.temperature if temperature is None else temperature
        runs = prompt_runs(prompts)
        prompt_ids, _, _ = trainer._tokenize_prompts([prompts[s] for s, _ in runs])
        device = trainer.accelerator.device
        if constraint.device != device:
            constraint.to(device)
        call_seed = seed + 1_000_003 * calls[0] + 7919 * trainer.accelerator.process_index
        calls[0] += 1
        completion_ids, logprobs = [None] * len(prompts), [None] * len(prompts)
        items, sid_start = [None] * len(prompts), [None] * len(prompts)
        t0 = time.perf_counter()
        with unwrap_model_for_generation(
                trainer.model_wrapped, trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model, \
                torch.no_grad():
            runner = make_runner(model)
            # one engine call per distinct run length (all runs are num_generations long but
            # where a group is split across processes)
            for length in sorted({n for _, n in runs}):
                which = [i for i, (_, n) in enumerate(runs) if n == length]
                roll = sample(model, [list(prompt_ids[i]) for i in which], constraint, tokenizer,
                              n=length, temperature=temp, top_p=top_p, mode=mode,
                              seed=call_seed + length, runner=runner, think_budget=think_budget,
                              answer_ids=fmt.answer if fmt else None,
                              stop_ids=(list(fmt.stop) or None) if fmt else None,
                              logprob_temperature=temp)
                tokens, lps, mask = roll.tokens.cpu(), roll.logprobs.cpu(), roll.mask.cpu()
                for j, i in enumerate(which):
                    start = runs[i][0]
                    for r in range(length):
                        row, at = j * length + r, start + r
                        completion_ids[at] = tokens[row][mask[row]].tolist()
                        logprobs[at] = lps[row][mask[row]].tolist()
                        items[at] = int(roll.items[row])
                        if roll.sid_start is not None:
                            sid_start[at] = int(roll.sid_start[row])
        mode_ = "train" if trainer.model.training else "eval"
        trainer._metrics[mode_]["gream/rollout_s"].append(time.perf_counter() - t0)
        out = {"prompt_ids": [list(prompt_ids[i]) for i, (_, n) in enumerate(runs)
                              for _ in range(n)],
               "completion_ids": completion_ids, "logprobs": logprobs, "item": items}
        if mode == "reasoning":
            out["sid_start"] = sid_start
        return out

    rollout.gream_constraint, rollout.gream_mode = constraint, mode
    return rollout


class SRPOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with SRPO's bonus-calibrated group advantage (kernels.group_advantage,
    pass@k bonus with k = pass_k) in place of TRL's mean/std advantage.

    skip_zero_variance: leave the groups whose rewards are all equal (advantage exactly 0) out
    of the "dapo" loss normaliser, so the loss is SRPO's token mean over the informative groups
    (what its dynamic sampling trains on) instead of one diluted by the zero-advantage tokens.
    Every reward callable made by sid_reward_func / gated_reward_func, and the rollout_func,
    is checked against processing_class at construction, and their constraint's index against
    the one the model records (model.index_record; allow_index_mismatch turns an error into a
    warning)."""

    def __init__(self, *args, pass_k: int = 4, skip_zero_variance: bool = True,
                 allow_index_mismatch: bool = False, **kwargs):
        check_trl_version()
        if pass_k < 1:
            raise InvalidInputError(f"pass_k: expected a positive integer, got {pass_k}")
        super().__init__(*args, **kwargs)
        self.pass_k, self.skip_zero_variance = int(pass_k), bool(skip_zero_variance)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        for fn in [*self.reward_funcs, self.rollout_func]:
            con = getattr(fn, "gream_constraint", None)
            if con is None:
                continue
            who = getattr(fn, "__name__", "rollout_func")
            check_tokenizer(con, tokenizer, mode=fn.gream_mode, who=who)
            check_pairing(self.model, con.index, index_name=f"{who}'s constraint",
                          allow_mismatch=allow_index_mismatch, flag="allow_index_mismatch=True")
            if fn.gream_mode == "direct" and con.eos_token_id not in self.eos_token_ids:
                raise InvalidInputError(
                    f"{who}: the constraint ends SIDs with token {con.eos_token_id}, which TRL "
                    f"does not take for the end of a completion (the model's generation_config "
                    f"eos_token_id: {self.eos_token_ids}): TRL would count every completion "
                    "as truncated. Build the constraint with that end token (eval."
                    "build_constraint does), or set generation_config.eos_token_id")
        self._gream_rewards = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gream_rewards = out  # [all processes' completions, reward funcs], gathered
        return out

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        per_func = self._gream_rewards
        if torch.isnan(per_func).all(1).any():
            bad = int(torch.nonzero(torch.isnan(per_func).all(1))[0])
            raise InvalidInputError(f"completion {bad}: every reward function returned None; "
                                    "SRPO's group advantage needs a reward for each completion")
        rewards = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(1)
        mode = "train" if self.model.training else "eval"
        n = self.num_generations if mode == "train" else self.num_generations_eval
        groups = torch.arange(len(rewards), device=rewards.device) // n
        adv = group_advantage(rewards.float().contiguous(), groups, k=self.pass_k)
        local = slice(self.accelerator.process_index * len(inputs),
                      (self.accelerator.process_index + 1) * len(inputs))
        out["advantages"] = adv[local].to(out["advantages"].device)
        logged = self._logs["advantages"]  # TRL logged its own advantages: show ours
        for _ in range(min(len(adv), len(logged))):
            logged.pop()
        logged.extend(adv.tolist())
        informative = (rewards.view(-1, n) != rewards.view(-1, n)[:, :1]).any(1)
        self._metrics[mode]["gream/informative_groups"].append(informative.float().mean().item())
        if self.skip_zero_variance and self.loss_type in ("dapo", "cispo", "vespo"):
            keep = informative.repeat_interleave(n)[local].to(out["completion_mask"].device)
            mask = out["completion_mask"] * out.get("tool_mask", 1)
            out["num_items_in_batch"] = self.accelerator.gather(
                (mask * keep[:, None]).sum()).sum()
        return out


def srpo_grpo_config(**overrides) -> GRPOConfig:
    """A GRPOConfig with SRPO's settings (METHOD.md section 5, in TRL's terms; see the module
    docstring), overridable by keyword. Explicit where TRL's defaults surprise: bf16 only on a
    GPU that has it (TRL turns it on even on CPU), no gradient checkpointing (SID completions
    are a few tokens; pass gradient_checkpointing=True for long reasoning completions), no
    external loggers. The reference model of the KL (beta > 0) is reloaded by TRL from the
    policy's path: pass the model as a path (or a model loaded from one)."""
    check_trl_version()
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    settings = dict(loss_type="dapo", epsilon=0.2, delta=10.0, beta=0.001, num_generations=10,
                    temperature=1.0, top_p=1.0, learning_rate=2e-6, weight_decay=0.1,
                    max_grad_norm=1.0, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
                    bf16=bf16, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
                    report_to=[])
    settings.update(overrides)
    return GRPOConfig(**settings)
