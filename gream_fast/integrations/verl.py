"""gream-fast inside verl (0.9.1): SRPO's advantage, reward and constrained rollouts on verl's
PPO trainer, through the hooks verl offers.

    mapfile -t SRPO < <(python -c "from gream_fast.integrations.verl import srpo_overrides
    print('\\n'.join(srpo_overrides('constraint.safetensors')))")
    python -m verl.trainer.main_ppo <your data / model / batch settings> "${SRPO[@]}"

- bonus_advantage: the bonus-calibrated group advantage as a verl advantage estimator
  (registered as "gream_bonus"): verl's batch holds each prompt's responses anywhere in the
  batch, identified by uid; they are regrouped for the kernel and put back.
- the "gream_sid" reward manager (GreamSIDRewardManager): the residual-sensitive reward from the
  response token ids (SIDs are special tokens: the decoded text that verl's reward functions
  get is empty), for verl's reward loop.
- the "gream_direct" / "gream_reasoning" agent loops: verl's single-turn rollout with each
  request opting in to gream-fast's vLLM logits processor (trie-constrained SIDs).
- srpo_overrides: the hydra overrides of an SRPO run (estimator, reward manager, dual-clip PPO
  loss, k3 KL to the reference, n rollouts under the trie through vLLM's logits processor).

verl finds these by name in registries that live in each process (the driver, the task runner,
the reward and agent-loop workers): the "verl.plugins" entry point of gream-fast fills them
wherever `import verl` runs, so nothing needs importing by hand.

bonus_advantage and SIDScorer are the library-free core (tensors, token ids): importing this
module does not import verl; the verl parts import it when first used.
"""
import functools
import os

import numpy as np
import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.integrations.core import (as_targets, check_mode, check_tokenizer,
                                          completion_rewards)
from gream_fast.kernels import group_advantage
from gream_fast.train.rewards import ThinkFormat

# The verl classes (GreamSIDRewardManager, Gream*AgentLoop) are left out: `import *` must not
# import verl.
__all__ = ["bonus_advantage", "register", "register_reward_manager", "register_agent_loops",
           "load_plugin", "SIDScorer", "srpo_overrides", "ESTIMATOR", "REWARD_MANAGER",
           "AGENT_LOOPS", "PASS_K_KEY", "LOGITS_PROCESSOR"]

ESTIMATOR, REWARD_MANAGER = "gream_bonus", "gream_sid"
AGENT_LOOPS = {"direct": "gream_direct", "reasoning": "gream_reasoning"}  # rollouts, by mode
PASS_K_KEY = "gream_pass_k"  # algorithm.<this>: the k of the pass@k bonus (default 4)
LOGITS_PROCESSOR = "gream_fast.integrations.vllm:SIDTrieLogitsProcessor"


# ---------------------------------------------------------------------------------------------
# The advantage estimator
# ---------------------------------------------------------------------------------------------
def _pass_k(config) -> int:
    k = None if config is None else config.get(PASS_K_KEY, None)
    if k is None:
        return 4
    try:
        ok = not isinstance(k, bool) and float(k).is_integer() and int(k) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(f"algorithm.{PASS_K_KEY}: expected a positive integer, got {k!r}")
    return int(k)


def bonus_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                    config=None, **kwargs):
    """verl's advantage-estimator contract: (token_level_rewards [B, T], response_mask [B, T],
    index = the uid of each response's prompt, config = the algorithm config) -> (advantages,
    returns), both [B, T], equal as in verl's GRPO. A response's reward is its token rewards'
    sum (verl puts the score on the last response token); its group is its uid, wherever the
    group's members are in the batch; k comes from config[PASS_K_KEY] (default 4). Other
    keyword arguments verl passes (reward_baselines, ...) are ignored."""
    if index is None:
        raise InvalidInputError("bonus_advantage: index is missing: it needs each response's uid "
                                "(verl passes data.non_tensor_batch['uid'])")
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise InvalidInputError(
            f"bonus_advantage: expected token_level_rewards and response_mask of one shape "
            f"[B, T], got {list(token_level_rewards.shape)} and {list(response_mask.shape)}")
    if len(index) != len(token_level_rewards):
        raise InvalidInputError(f"bonus_advantage: index has {len(index)} uids for "
                                f"{len(token_level_rewards)} responses")
    k = _pass_k(config)
    rewards = token_level_rewards.float().sum(-1)
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        raise InvalidInputError(f"bonus_advantage: response {i} (uid {index[i]!r}) has reward "
                                f"{rewards[i].item()}; rewards must be finite")
    # The kernel wants each group contiguous: number the uids by first appearance, sort stably
    # (a group keeps its members' order, which the result does not depend on), undo after.
    first = {}
    groups = torch.tensor([first.setdefault(u, len(first)) for u in index], dtype=torch.int64)
    order = torch.argsort(groups, stable=True).to(rewards.device)
    sorted_adv = group_advantage(rewards[order], groups.to(rewards.device)[order], k=k,
                                 response_mask=response_mask[order], check=False)
    adv = torch.empty_like(sorted_adv)
    adv[order] = sorted_adv
    return adv, adv


def register(name: str = ESTIMATOR) -> str:
    """Register bonus_advantage with verl's register_adv_est under `name` (again: a no-op)."""
    from verl.trainer.ppo.core_algos import register_adv_est

    register_adv_est(name)(bonus_advantage)
    return name


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------
class SIDScorer:
    """One response's reward from its token ids (library-free): the residual-sensitive reward
    (direct mode: the response is a SID closed by EOS) or the gated one (reasoning mode: think
    block, then <answer>SID</answer>, else 0), as core.completion_rewards computes them.
    Direct mode: a response that is not a SID raises (on_invalid="raise": rollouts under the
    trie never make one) or scores 0 (on_invalid="zero")."""

    def __init__(self, constraint: SIDConstraint, tokenizer, *, mode: str = "direct",
                 on_invalid: str = "raise", who: str = "gream_sid reward"):
        check_mode(mode)
        if on_invalid not in ("raise", "zero"):
            raise InvalidInputError(f"{who}: on_invalid: expected 'raise' or 'zero', got "
                                    f"{on_invalid!r}")
        check_tokenizer(constraint, tokenizer, mode=mode, who=who)
        self.constraint, self.mode, self.on_invalid, self.who = constraint, mode, on_invalid, who
        self.fmt = ThinkFormat.from_tokenizer(tokenizer) if mode == "reasoning" else None

    def __call__(self, response_ids, target, field: str = "target", uid=None):
        """(reward, extra): extra = {"acc": 1.0 for the exact item, "match": leading SID tokens
        shared with the target's, "valid": 1.0 for a SID (direct) / the format (reasoning)}."""
        where = self.who + ("" if uid is None else f" (uid {uid!r})")
        try:
            tgt = as_targets([target], 1, self.constraint.num_items, field)
            out = completion_rewards([response_ids], tgt, self.constraint, mode=self.mode,
                                     fmt=self.fmt, on_invalid=self.on_invalid)
        except InvalidInputError as e:
            raise InvalidInputError(f"{where}: {e}") from None
        reward = float(out.reward[0])
        return reward, {"acc": float(reward == 1.0), "match": int(out.match[0]),
                        "valid": float(out.valid[0])}


def _reward_kwargs(config) -> dict:
    kw = config.get("reward", {}).get("reward_kwargs", None)
    return dict(kw) if kw else {}


def _ground_truth(non_tensor: dict, target_key: str):
    """(value, field): reward_model.ground_truth (verl's dataset layout), else the column
    `target_key`."""
    rm = non_tensor.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        return rm["ground_truth"], "reward_model.ground_truth"
    if non_tensor.get(target_key) is not None:
        return non_tensor[target_key], target_key
    raise InvalidInputError(
        f"gream_sid reward: the sample has no reward_model.ground_truth and no {target_key!r} "
        f"column: expected the target item id in one of them (fields: {sorted(non_tensor)})")


# ---------------------------------------------------------------------------------------------
# The verl classes: built on first use (they subclass verl's), named as module attributes so
# that hydra's _target_ strings and pickle find them (module __getattr__ below)
# ---------------------------------------------------------------------------------------------
def _as_attribute(cls, name: str):
    cls.__name__ = cls.__qualname__ = name
    return cls


@functools.cache
def _reward_manager_cls():
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    class GreamSIDRewardManager(RewardManagerBase):
        """verl reward manager "gream_sid": scores each response's token ids with SIDScorer.

        Settings, under reward.reward_kwargs: constraint (the file of vllm.save_constraint or
        SIDConstraint.save, required),
        mode ("direct" | "reasoning"), on_invalid ("raise" | "zero"), target_key (the column
        with the target item id when a sample has no reward_model.ground_truth; "target").
        run_single returns verl's {"reward_score", "reward_extra_info"}; verl puts the score
        on the last valid response token (assemble_rm_scores / the agent loop)."""

        def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                     reward_model_tokenizer=None, **kwargs):
            super().__init__(config, tokenizer, compute_score)
            kw = _reward_kwargs(config)
            unknown = set(kw) - {"constraint", "mode", "on_invalid", "target_key"}
            if unknown:
                raise InvalidInputError(f"reward.reward_kwargs: unknown setting(s) "
                                        f"{sorted(unknown)} for the gream_sid reward manager")
            if not kw.get("constraint"):
                raise InvalidInputError("reward.reward_kwargs.constraint: missing: the path of "
                                        "the constraint file (integrations.vllm.save_constraint)")
            self.target_key = kw.get("target_key", "target")
            self.scorer = SIDScorer(SIDConstraint.load(kw["constraint"]), tokenizer,
                                    mode=kw.get("mode", "direct"),
                                    on_invalid=kw.get("on_invalid", "raise"))

        async def run_single(self, data) -> dict:
            item = data[-1:][0]  # multi-turn: the last turn's response, as verl's managers do
            ids = item.batch["responses"]
            length = int(item.batch["attention_mask"][-ids.shape[-1]:].sum())
            target, field = _ground_truth(item.non_tensor_batch, self.target_key)
            score, extra = self.scorer(ids[:length], target, field,
                                       uid=item.non_tensor_batch.get("uid"))
            return {"reward_score": score, "reward_extra_info": extra}

    return _as_attribute(GreamSIDRewardManager, "GreamSIDRewardManager")


@functools.cache
def _agent_loop_cls(mode: str):
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    from gream_fast.integrations.vllm import MODE_KEY

    class GreamAgentLoop(SingleTurnAgentLoop):
        """verl's single-turn rollout, with every request opting in to gream-fast's vLLM
        logits processor (SamplingParams.extra_args[MODE_KEY] = the mode): verl builds the
        sampling parameters from its config alone, which has no field for extra_args."""

        async def run(self, sampling_params, **kwargs):
            extra = {**(sampling_params.get("extra_args") or {}), MODE_KEY: mode}
            return await super().run({**sampling_params, "extra_args": extra}, **kwargs)

    return _as_attribute(GreamAgentLoop, f"Gream{mode.capitalize()}AgentLoop")


_LAZY = {"GreamSIDRewardManager": _reward_manager_cls,
         "GreamDirectAgentLoop": lambda: _agent_loop_cls("direct"),
         "GreamReasoningAgentLoop": lambda: _agent_loop_cls("reasoning")}


def register_reward_manager(name: str = REWARD_MANAGER):
    """Register GreamSIDRewardManager in verl's reward-loop registry under `name` (again: a
    no-op); returns the class."""
    from verl.experimental.reward_loop.reward_manager import register as register_manager

    return register_manager(name)(_reward_manager_cls())


def register_agent_loops() -> dict:
    """Register the rollout agent loops ({mode: name}, AGENT_LOOPS) in verl's agent-loop
    registry (again: a no-op)."""
    from verl.experimental.agent_loop.agent_loop import register as register_loop

    for mode, name in AGENT_LOOPS.items():
        register_loop(name)(_agent_loop_cls(mode))
    return dict(AGENT_LOOPS)


def load_plugin():
    """Register the estimator, the reward manager and the agent loops under their names."""
    register()
    register_reward_manager()
    register_agent_loops()


def __getattr__(name):
    # PEP 562. verl 0.9.1 loads every "verl.plugins" entry point in verl/__init__.py at
    # `import verl` with EntryPoint.load(), i.e. getattr(this module, "plugin"): looking the
    # name up registers, whichever of verl and this module was imported first.
    if name == "plugin":
        load_plugin()
        return load_plugin
    if name in _LAZY:
        return _LAZY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# The run's settings
# ---------------------------------------------------------------------------------------------
def _quoted(path: str) -> str:
    if "'" in path or "\\" in path:
        raise InvalidInputError(f"constraint path {path!r}: quotes and backslashes cannot pass "
                                "through a hydra override; move or link the file")
    return f"'{path}'"


def srpo_overrides(constraint_path, *, mode: str = "direct", n: int = 10, k: int = 4,
                   temperature: float = 1.0, on_invalid: str = "raise",
                   dynamic_sampling: bool = True, clip_ratio: float = 0.2,
                   clip_ratio_c: float = 10.0, kl_coef: float = 0.001, lr: float = 2e-6,
                   warmup_steps: int = 10, weight_decay: float = 0.1,
                   grad_clip: float = 1.0) -> list[str]:
    """Hydra overrides of verl's ppo_trainer for SRPO (METHOD.md section 5), checked against
    verl 0.9.1's config: the gream_bonus advantage with k, the gream_sid reward manager on the
    constraint, PPO clip + dual clip (clip_ratio_c) with a token-mean loss, k3 (low_var_kl) KL
    loss to the reference and none in the reward, n vLLM rollouts per prompt at `temperature`
    under gream-fast's trie logits processor (loaded from the constraint file; each request
    opts in through the mode's agent loop), dynamic sampling (verl's filter_groups on the
    reward: groups whose rewards are all equal are dropped), and the reference's optimizer.
    Batch sizes, lengths, data and model are the run's own. The constraint path is made
    absolute: verl's workers run elsewhere."""
    check_mode(mode)
    for name, v, low in (("n", n, 1), ("k", k, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise InvalidInputError(f"srpo_overrides: {name}: expected an integer >= {low}, got "
                                    f"{v!r}")
    if on_invalid not in ("raise", "zero"):
        raise InvalidInputError(f"srpo_overrides: on_invalid: expected 'raise' or 'zero', got "
                                f"{on_invalid!r}")
    if not temperature > 0 or not clip_ratio_c > 1:
        raise InvalidInputError(f"srpo_overrides: expected temperature > 0 and clip_ratio_c > 1 "
                                f"(dual clip), got {temperature} and {clip_ratio_c}")
    path = os.path.abspath(os.fspath(constraint_path))
    if not os.path.isfile(path):
        raise InvalidInputError(f"constraint {path}: no such file (write it with "
                                "gream_fast.integrations.vllm.save_constraint)")
    path = _quoted(path)
    actor, rollout = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    vllm = f"++{rollout}.engine_kwargs.vllm"
    return [
        f"algorithm.adv_estimator={ESTIMATOR}",
        f"++algorithm.{PASS_K_KEY}={k}",
        "algorithm.use_kl_in_reward=False",
        f"algorithm.filter_groups.enable={dynamic_sampling}",
        "algorithm.filter_groups.metric=reward",
        "reward.reward_manager.source=register",
        f"reward.reward_manager.name={REWARD_MANAGER}",
        f"++reward.reward_kwargs.constraint={path}",
        f"++reward.reward_kwargs.mode={mode}",
        f"++reward.reward_kwargs.on_invalid={on_invalid}",
        f"{actor}.policy_loss.loss_mode=vanilla",
        f"{actor}.clip_ratio={clip_ratio}",
        f"{actor}.clip_ratio_low={clip_ratio}",
        f"{actor}.clip_ratio_high={clip_ratio}",
        f"{actor}.clip_ratio_c={clip_ratio_c}",
        f"{actor}.loss_agg_mode=token-mean",
        f"{actor}.entropy_coeff=0",
        f"{actor}.use_kl_loss=True",
        f"{actor}.kl_loss_coef={kl_coef}",
        f"{actor}.kl_loss_type=low_var_kl",
        f"{actor}.optim.lr={lr}",
        f"{actor}.optim.lr_warmup_steps={warmup_steps}",
        f"{actor}.optim.lr_scheduler_type=constant",
        f"{actor}.optim.weight_decay={weight_decay}",
        f"{actor}.optim.clip_grad={grad_clip}",
        f"{rollout}.name=vllm",
        f"{rollout}.n={n}",
        f"{rollout}.temperature={temperature}",
        f"{rollout}.agent.default_agent_loop={AGENT_LOOPS[mode]}",
        f"{vllm}.logits_processors=['{LOGITS_PROCESSOR}']",
        f"{vllm}.additional_config.gream_constraint={path}",
    ]
