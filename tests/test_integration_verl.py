"""gream-fast inside verl 0.9.1 for real: the gream_bonus estimator through verl's
compute_advantage, the gream_sid reward manager through verl's registry, loader and score
placement, the plugin entry point in a fresh process, and srpo_overrides composed with verl's
own hydra config. No Ray, no GPU, no vLLM (not installed here)."""
import asyncio
import atexit
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate import SIDConstraint
from gream_fast.index import SemanticIndex
from gream_fast.index.tokens import add_sid_tokens
from gream_fast.integrations.vllm import save_constraint
from gream_fast.kernels import group_advantage_reference
from gream_fast.model.tiny import train_tokenizer

# A fresh interpreter: `import verl` alone must register both names through the entry point.
PLUGIN_PROBE = """
import json
import verl
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
print(json.dumps([get_adv_estimator_fn("gream_bonus").__module__,
                  get_reward_manager_cls("gream_sid").__name__,
                  _agent_loop_registry["gream_direct"]["_target_"]]))
"""
# bonus_advantage without verl: an import of verl fails in this interpreter.
NO_VERL_PROBE = """
import sys
sys.modules["verl"] = None
import torch
from gream_fast.integrations.verl import bonus_advantage
adv, _ = bonus_advantage(torch.tensor([[0., 1.], [0., 0.]]), torch.ones(2, 2), ["a", "a"])
print(adv[0, 0].item() > 0 > adv[1, 0].item())
"""


def _start_probes():
    """Started as the module is imported, so that the probes' `import verl` (~12 s of CPU)
    overlaps this process's own (2 cores); outside the checkout, so the installed package and
    its entry point are what is found."""
    if importlib.util.find_spec("verl") is None:
        return {}
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    procs = {name: subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                    cwd=tempfile.gettempdir(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
             for name, code in (("plugin", PLUGIN_PROBE), ("no_verl", NO_VERL_PROBE))}
    for p in procs.values():
        atexit.register(p.kill)  # a no-op once it has exited
    return procs


PROBES = _start_probes()
verl = pytest.importorskip("verl")
pytest.importorskip("hydra")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402

from gream_fast.integrations import verl as gv  # noqa: E402

# -- the advantage estimator ------------------------------------------------------------------
REWARDS = np.array([0.0, 0.5, 0.707, 0.866, 0.95, 1.0])


def verl_batch(sizes, T, seed):
    """A DataProto as verl's trainer hands it over: groups of `sizes` responses under string
    uids, shuffled (groups interleaved), ragged response lengths, the score on the last
    response token, and some exact hits in most groups (the bonus)."""
    rng = np.random.default_rng(seed)
    uid = np.concatenate([[f"prompt-{g}"] * n for g, n in enumerate(sizes)])
    reward = rng.choice(REWARDS, len(uid), p=[.3, .2, .1, .1, .05, .25])
    perm = rng.permutation(len(uid))
    uid, reward = uid[perm], reward[perm]
    length = torch.from_numpy(rng.integers(1, T + 1, len(uid)))
    mask = (torch.arange(T)[None] < length[:, None]).long()
    scores = torch.zeros(len(uid), T)
    scores[torch.arange(len(uid)), length - 1] = torch.from_numpy(reward).float()
    data = DataProto.from_dict(tensors={"token_level_rewards": scores, "response_mask": mask},
                               non_tensors={"uid": uid.astype(object)})
    return data, uid, torch.from_numpy(reward).float(), mask


def expected_advantage(uid, reward, mask, k):
    """group_advantage_reference on the batch sorted by uid string (another regrouping than
    bonus_advantage's), then put back."""
    order = torch.from_numpy(np.argsort(uid, kind="stable"))
    groups = torch.from_numpy(np.unique(uid, return_inverse=True)[1])
    ref = group_advantage_reference(reward[order], groups[order], k=k, response_mask=mask[order])
    out = torch.empty_like(ref)
    out[order] = ref
    return out


@pytest.mark.parametrize("k", [None, 3])
def test_compute_advantage_regroups_shuffled_uids(k):
    from verl.trainer.ppo.ray_trainer import compute_advantage

    assert gv.register() == gv.register() == "gream_bonus"  # idempotent
    sizes = [10, 1, 3, 6, 4, 2, 7, 5]  # a group of 1, groups smaller than k
    config = None if k is None else OmegaConf.create({"adv_estimator": "gream_bonus",
                                                      gv.PASS_K_KEY: k})
    for seed in range(3):
        data, uid, reward, mask = verl_batch(sizes, T=9, seed=seed)
        assert any(uid[i] == uid[i + 2] and uid[i] != uid[i + 1] for i in range(len(uid) - 2))
        out = compute_advantage(data, adv_estimator="gream_bonus", config=config)
        want = expected_advantage(uid, reward, mask, 4 if k is None else k)
        torch.testing.assert_close(out.batch["advantages"], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.batch["returns"], out.batch["advantages"])
        assert (out.batch["advantages"][mask == 0] == 0).all()
    # the bonus is in play (without it, k above every group's size, the values differ)
    assert not torch.allclose(want, expected_advantage(uid, reward, mask, max(sizes) + 1))


def test_bonus_advantage_bad_input():
    r, m = torch.zeros(3, 4), torch.ones(3, 4)
    with pytest.raises(InvalidInputError, match="uid"):
        gv.bonus_advantage(r, m)
    with pytest.raises(InvalidInputError, match="2 uids for 3"):
        gv.bonus_advantage(r, m, index=["a", "b"])
    with pytest.raises(InvalidInputError, match="one shape"):
        gv.bonus_advantage(r, m[:, :2], index=["a", "b", "c"])
    r[1, 2] = float("nan")
    with pytest.raises(InvalidInputError, match="response 1 .uid 'b'. has reward nan"):
        gv.bonus_advantage(r, m, index=["a", "b", "c"])
    with pytest.raises(InvalidInputError, match="gream_pass_k"):
        gv.bonus_advantage(torch.zeros(3, 4), m, index="abc", config={gv.PASS_K_KEY: 0})


# -- the reward manager -----------------------------------------------------------------------
MARKERS = ["<think>", "</think>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def sid_setup(tmp_path_factory):
    """A real (tiny, byte-level BPE) tokenizer with the SID tokens, an index with a collision
    (SIDs of 3 and 4 tokens), and both constraints saved."""
    root = tmp_path_factory.mktemp("verl")
    tok = train_tokenizer(MARKERS * 20 + ["the user likes sci-fi and old films"] * 20, 300)
    codes = np.random.default_rng(0).integers(0, 4, (12, 3))
    codes[1] = codes[0]
    index = SemanticIndex.from_codes(codes, 4)
    add_sid_tokens(tok, index=index)
    paths = {"direct": root / "direct.safetensors", "reasoning": root / "reasoning.safetensors"}
    end = tok("</answer>", add_special_tokens=False)["input_ids"][0]
    # the files the vLLM processor reads: the reward manager reads the same
    save_constraint(SIDConstraint(index, tok), paths["direct"], tok)
    save_constraint(SIDConstraint(index, tok, eos_token_id=end), paths["reasoning"], tok)
    return tok, index, paths


def sid_ids(tok, index, item):
    return tok.convert_tokens_to_ids(index.sid(item))


def manager(path, tok, **kw):
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    cls = get_reward_manager_cls("gream_sid")  # registered by the plugin at `import verl`
    config = OmegaConf.create({"reward": {"reward_kwargs": {"constraint": str(path), **kw}}})
    return cls(config=config, tokenizer=tok, compute_score=None)


def reward_batch(responses, targets=None, pad=3, **columns):
    """A DataProto as verl's reward loop hands it over: left-padded prompts, right-padded
    responses (with `pad`, here not a SID token), the attention mask over both."""
    B, T, P = len(responses), max(map(len, responses)) + 2, 4
    prompts = torch.full((B, P), pad)
    responses_t = torch.full((B, T), pad)
    attention = torch.zeros(B, P + T, dtype=torch.long)
    for i, r in enumerate(responses):
        p = 1 + i % P
        prompts[i, P - p:] = 5
        responses_t[i, :len(r)] = torch.tensor(r)
        attention[i, P - p:P + len(r)] = 1
    non_tensors = {k: np.array(v, dtype=object) for k, v in columns.items()}
    if targets is not None:
        non_tensors["reward_model"] = np.array([{"ground_truth": t} for t in targets],
                                               dtype=object)
    non_tensors["uid"] = np.array([f"u{i}" for i in range(B)], dtype=object)
    return DataProto.from_dict(tensors={"prompts": prompts, "responses": responses_t,
                                        "attention_mask": attention},
                               non_tensors=non_tensors)


def run(mgr, data):
    async def all_rows():
        return await asyncio.gather(*(mgr.run_single(data[i:i + 1]) for i in range(len(data))))
    return asyncio.run(all_rows())


def match_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_reward_manager_direct_scores_token_ids(sid_setup):
    tok, index, paths = sid_setup
    mgr = manager(paths["direct"], tok)
    eos = tok.eos_token_id
    rng = np.random.default_rng(1)
    pairs = [(0, 0), (0, 1), (1, 0), (5, 5)] + [tuple(rng.integers(0, 12, 2)) for _ in range(8)]
    responses = [sid_ids(tok, index, p) + [eos] for p, _ in pairs]
    responses.append(sid_ids(tok, index, 1))  # cut off before EOS: still scored by its prefix
    pairs.append((1, 1))
    targets = [str(t) if i % 2 else int(t) for i, (_, t) in enumerate(pairs)]  # str: parquet
    data = reward_batch(responses, targets)
    out = run(mgr, data)
    for (p, t), o in zip(pairs, out):
        m = match_len(sid_ids(tok, index, p), sid_ids(tok, index, t))
        want = 1.0 if p == t else [0.0, 0.5, 0.707, 0.866, 0.95][min(m, 4)]
        assert o["reward_score"] == pytest.approx(want)
        assert o["reward_extra_info"] == {"acc": float(p == t), "match": m, "valid": 1.0}
    # verl's placement (the base class's assemble_rm_scores): the last valid response token
    scores = [o["reward_score"] for o in out]
    rm = type(mgr).assemble_rm_scores(data, scores)
    last = torch.tensor([len(r) - 1 for r in responses])
    assert torch.equal(rm[torch.arange(len(rm)), last], torch.tensor(scores))
    assert rm.sum().item() == pytest.approx(sum(scores))
    # the target from an int column, for datasets without reward_model
    assert run(mgr, reward_batch(responses[:2], target=[0, 1])) == out[:2]


def test_reward_manager_direct_invalid_and_bad_ground_truth(sid_setup):
    tok, index, paths = sid_setup
    eos, word = tok.eos_token_id, tok("films", add_special_tokens=False)["input_ids"][0]
    bad = [sid_ids(tok, index, 2)[:1] + [word, eos]]
    with pytest.raises(InvalidInputError, match=rf"uid 'u0'.*token {word} at position 1"):
        run(manager(paths["direct"], tok), reward_batch(bad, [2]))
    out = run(manager(paths["direct"], tok, on_invalid="zero"), reward_batch(bad, [2]))
    assert out[0] == {"reward_score": 0.0,
                      "reward_extra_info": {"acc": 0.0, "match": 0, "valid": 0.0}}
    good = [sid_ids(tok, index, 2) + [eos]]
    mgr = manager(paths["direct"], tok)
    with pytest.raises(InvalidInputError, match=r"reward_model.ground_truth.*'item 2'"):
        run(mgr, reward_batch(good, ["item 2"]))
    with pytest.raises(InvalidInputError, match=r"= 12: expected an item id in 0..11"):
        run(mgr, reward_batch(good, [12]))
    with pytest.raises(InvalidInputError, match="no reward_model.ground_truth and no 'target'"):
        run(mgr, reward_batch(good))
    with pytest.raises(InvalidInputError, match="reward_kwargs.constraint: missing"):
        manager("", tok)
    with pytest.raises(InvalidInputError, match="unknown setting.*'modes'"):
        manager(paths["direct"], tok, modes="direct")


def test_reward_manager_reasoning_gates_the_format(sid_setup):
    tok, index, paths = sid_setup
    mgr = manager(paths["reasoning"], tok, mode="reasoning")
    sid = "".join(index.sid(7))

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    responses = [ids(f"<think>the user likes sci-fi</think><answer>{sid}</answer>"),
                 ids(f"<think>old films</think> so <answer>{''.join(index.sid(8))}</answer>"),
                 ids(f"the user likes sci-fi <answer>{sid}</answer>"),  # no think block
                 ids(f"<think>sci-fi</think><answer>{sid} films</answer>")]  # not only SID
    out = run(mgr, reward_batch(responses, [7, 7, 7, 7]))
    m = match_len(sid_ids(tok, index, 8), sid_ids(tok, index, 7))
    assert [o["reward_score"] for o in out] == pytest.approx(
        [1.0, [0.0, 0.5, 0.707, 0.866, 0.95][min(m, 4)], 0.0, 0.0])
    assert [o["reward_extra_info"]["valid"] for o in out] == [1.0, 1.0, 0.0, 0.0]


def test_constraint_tokenizer_mismatch_is_a_clear_error(sid_setup, tmp_path):
    tok, index, paths = sid_setup
    con = SIDConstraint.load(paths["direct"])
    swapped = SIDConstraint(index, token_table=con.token_table[:, ::-1],
                            eos_token_id=con.eos_token_id)
    swapped.save(tmp_path / "swapped.safetensors")
    with pytest.raises(InvalidInputError, match="gream_sid reward: the constraint and the "
                                                "tokenizer disagree on SID token"):
        manager(tmp_path / "swapped.safetensors", tok)
    # reasoning mode needs the constraint that ends SIDs with </answer>
    with pytest.raises(InvalidInputError, match="ends SIDs with .*first token of '</answer>'"):
        manager(paths["direct"], tok, mode="reasoning")


# -- the rollout: verl's single-turn agent loop, each request opting in to the trie -----------
@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_agent_loop_opts_requests_in(mode, monkeypatch):
    from hydra.utils import get_class
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    from gream_fast.integrations.vllm import MODE_KEY

    assert gv.register_agent_loops()[mode] == f"gream_{mode}"
    # verl's agent-loop worker instantiates the registry's _target_ with hydra
    cls = get_class(_agent_loop_registry[f"gream_{mode}"]["_target_"])
    assert issubclass(cls, SingleTurnAgentLoop) and cls is getattr(gv, cls.__name__)
    seen = []

    async def parent_run(self, sampling_params, **kwargs):  # verl's loop, recorded
        seen.append((sampling_params, kwargs))
        return "output"

    monkeypatch.setattr(SingleTurnAgentLoop, "run", parent_run)
    params = {"temperature": 1.0, "extra_args": {"other": 1}}
    assert asyncio.run(cls.run(object.__new__(cls), params, raw_prompt=["hi"])) == "output"
    assert seen == [({"temperature": 1.0, "extra_args": {"other": 1, MODE_KEY: mode}},
                     {"raw_prompt": ["hi"]})]
    assert params == {"temperature": 1.0, "extra_args": {"other": 1}}  # the caller's, untouched


# -- the run's settings through verl's hydra config -------------------------------------------
def test_srpo_overrides_compose_with_verls_config(sid_setup, tmp_path):
    from hydra import compose, initialize_config_dir
    from verl.experimental.reward_loop.reward_loop import migrate_legacy_reward_impl
    from verl.trainer.ppo.reward import load_reward_manager
    from verl.utils.config import omega_conf_to_dataclass

    tok, _, paths = sid_setup
    path = tmp_path / "a dir with spaces" / "constraint.safetensors"
    path.parent.mkdir()
    path.write_bytes(paths["reasoning"].read_bytes())
    overrides = gv.srpo_overrides(path, mode="reasoning", n=8, k=3, temperature=0.9) + [
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"]  # the run's own
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    alg, actor = cfg.algorithm, cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    assert (alg.adv_estimator, alg[gv.PASS_K_KEY], alg.use_kl_in_reward) == ("gream_bonus", 3,
                                                                             False)
    assert alg.filter_groups.enable and alg.filter_groups.metric == "reward"
    assert (actor.policy_loss.loss_mode, actor.clip_ratio, actor.clip_ratio_low,
            actor.clip_ratio_high, actor.clip_ratio_c, actor.loss_agg_mode) == (
        "vanilla", 0.2, 0.2, 0.2, 10.0, "token-mean")
    assert (actor.use_kl_loss, actor.kl_loss_coef, actor.kl_loss_type) == (True, 0.001,
                                                                           "low_var_kl")
    assert (actor.optim.lr, actor.optim.lr_warmup_steps, actor.optim.weight_decay,
            actor.optim.clip_grad) == (2e-6, 10, 0.1, 1.0)
    assert (rollout.name, rollout.n, rollout.temperature) == ("vllm", 8, 0.9)
    assert rollout.agent.default_agent_loop == "gream_reasoning"
    assert OmegaConf.to_container(rollout.engine_kwargs.vllm) == {
        "logits_processors": ["gream_fast.integrations.vllm:SIDTrieLogitsProcessor"],
        "additional_config": {"gream_constraint": str(path)}}
    # verl's own consumers accept them: the typed configs, the estimator's k, the legacy
    # reward migration main_ppo runs, and verl's reward-manager loader
    actor_cfg = omega_conf_to_dataclass(actor)
    assert (actor_cfg.clip_ratio_c, actor_cfg.kl_loss_type) == (10.0, "low_var_kl")
    # verl's vLLM server turns engine_kwargs.vllm into CLI flags by type: a list -> --flag a b,
    # a dict -> --flag <json> (vllm_rollout/utils.py build_cli_args_from_config)
    engine = omega_conf_to_dataclass(rollout).engine_kwargs["vllm"]
    assert type(engine["logits_processors"]) is list and type(engine["additional_config"]) is dict
    assert gv._pass_k(alg) == 3
    cfg = migrate_legacy_reward_impl(cfg)
    mgr = load_reward_manager(cfg, tok)
    assert type(mgr).__name__ == "GreamSIDRewardManager" and mgr.scorer.mode == "reasoning"
    with pytest.raises(InvalidInputError, match="no such file"):
        gv.srpo_overrides(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidInputError, match="mode"):
        gv.srpo_overrides(path, mode="beam")
    with pytest.raises(InvalidInputError, match="n: expected an integer >= 1"):
        gv.srpo_overrides(path, n=0)


# -- the plugin and the library-free core, in fresh interpreters (started at import) ----------
def test_fresh_import_verl_finds_the_plugin():
    out, err = PROBES["plugin"].communicate(timeout=120)
    assert PROBES["plugin"].returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == [
        "gream_fast.integrations.verl", "GreamSIDRewardManager",
        "gream_fast.integrations.verl.GreamDirectAgentLoop"]


def test_bonus_advantage_runs_without_verl():
    out, err = PROBES["no_verl"].communicate(timeout=120)
    assert PROBES["no_verl"].returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "True"
