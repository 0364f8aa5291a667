"""gream-fast inside TRL for real: SRPOGRPOTrainer trains a tiny Qwen3 on CPU with
gream_rollout_func and sid_reward_func (TRL 1.16's GRPOTrainer, its loss and optimizer), and
the rollout serves prompts the way TRL hands them over."""
import os

import numpy as np
import pytest
import torch

from gream_fast.errors import GreamError, InvalidInputError
from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
from gream_fast.generate import SIDConstraint
from gream_fast.integrations.core import pad_rows
from gream_fast.kernels import group_advantage_reference
from gream_fast.index import SemanticIndex
from gream_fast.model.tiny import build_tiny
from gream_fast.train.rewards import ThinkFormat

from tiny_data import make_data_and_index

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gream_fast.integrations import trl as gt  # noqa: E402

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, intermediate_size=64)
N = 4  # completions per prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    data, index = make_data_and_index(root)
    _, tok = build_tiny(root / "data", index, root / "model", seed=0, vocab_size=400,
                        shape=SHAPE)  # the model records its index (model.index_record)
    return root, data, index, tok


def prompts_and_targets(data, index, tok, count, seed=0, mode="direct"):
    """Chat prompts (the seqrec or reasoning prompt of a user's history, as messages: TRL
    applies the chat template) and each one's next item, from the dataset."""
    prompts = SeqRecPrompts(tok, index, mode=mode)
    rng = np.random.default_rng(seed)
    users = rng.choice(len(data.sequences), count, replace=False)
    seqs = [data.sequences[u]["items"] for u in users]
    return [prompts.messages(s[:-1][-5:]) for s in seqs], [int(s[-1]) for s in seqs]


def constraint_for(tok, index, mode="direct"):
    """The constraint our own SRPO uses: SIDs end with the chat template's end of turn
    (direct) or with the first token of </answer> (reasoning)."""
    return build_constraint(tok, index, SeqRecPrompts(tok, index, mode=mode), "cpu")


class Recording(gt.SRPOGRPOTrainer):
    """Keeps what each generation batch produced: TRL's batch dict and the gathered rewards."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.record.append((out, self._gream_rewards.clone()))
        return out


def make_trainer(root, tok, constraint, prompts, targets, *, reward, mode="direct", steps=2,
                 temperature=1.0, **kw):
    args = gt.srpo_grpo_config(
        temperature=temperature,
        output_dir=str(root / "out"), per_device_train_batch_size=2 * N,
        num_generations=N, max_steps=steps, learning_rate=1e-2, warmup_steps=0,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, shuffle_dataset=False,
        model_init_kwargs={"dtype": torch.float32})
    trainer = Recording(model=str(root / "model"), args=args, processing_class=tok,
                        train_dataset=datasets.Dataset.from_dict({"prompt": prompts,
                                                                  "target": targets}),
                        reward_funcs=reward,
                        rollout_func=gt.gream_rollout_func(constraint, tok, mode=mode, **kw))
    trainer.record = []
    return trainer


def completions(out):
    ids, mask = out["completion_ids"], out["completion_mask"].bool()
    return [ids[i][mask[i]].tolist() for i in range(len(ids))]


def test_srpo_grpo_trainer_trains_on_real_items(tiny):
    root, data, index, tok = tiny
    constraint = constraint_for(tok, index)
    prompts, targets = prompts_and_targets(data, index, tok, 4)
    trainer = make_trainer(root, tok, constraint, prompts, targets,
                           reward=gt.sid_reward_func(constraint))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2 and len(trainer.record) == 2
    informed = []
    for out, per_func in trainer.record:
        rows = completions(out)
        assert len(rows) == 2 * N
        items = constraint.trie.lookup(pad_rows(rows))
        assert (items >= 0).all(), "a completion is not a real item"
        assert all(r[-1] == constraint.eos_token_id for r in rows)
        rewards = per_func[:, 0]
        groups = torch.arange(len(rewards)) // N
        want = group_advantage_reference(rewards, groups, k=4)
        torch.testing.assert_close(out["advantages"], want, atol=1e-5, rtol=1e-5)
        informative = (rewards.view(-1, N) != rewards.view(-1, N)[:, :1]).any(1)
        informed.append(bool(informative.any()))
        # the "dapo" normaliser counts the tokens of groups with reward variance only
        keep = informative.repeat_interleave(N)
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"][keep].sum())
    assert any(informed), "no group had reward variance: the advantages were all 0"
    after = dict(trainer.model.named_parameters())
    assert max((after[k].detach() - v).abs().max().item() for k, v in before.items()) > 1e-4


def test_rollout_serves_split_groups_in_trl_order_with_trl_logprobs(tiny):
    """Runs of unequal length (a group split across processes) keep TRL's order, and the
    reported log-probs are the ones TRL's own forward computes at its temperature."""
    root, data, index, tok = tiny
    constraint = constraint_for(tok, index)
    base, targets = prompts_and_targets(data, index, tok, 3, seed=1)
    trainer = make_trainer(root, tok, constraint, base, targets,
                           reward=gt.sid_reward_func(constraint), temperature=0.7)
    prompts = [base[0]] * 3 + [base[1]] * 5 + [base[2]]
    out = trainer.rollout_func(prompts, trainer)
    assert len(out["completion_ids"]) == len(prompts) == len(out["item"])
    expected_ids = [tok.apply_chat_template(p, add_generation_prompt=True, return_dict=True)
                    ["input_ids"] for p in prompts]
    assert out["prompt_ids"] == expected_ids
    items = constraint.trie.lookup(pad_rows(out["completion_ids"]))
    assert (items >= 0).all() and items.tolist() == out["item"]
    assert_trl_logprobs(trainer, out)


def assert_trl_logprobs(trainer, out):
    """The rollout's log-probs equal TRL's recomputation: its patched forward at
    trainer.temperature over the full vocabulary, on left-padded prompts."""
    left = torch.tensor(pad_rows([p[::-1] for p in out["prompt_ids"]])).flip(1)
    right = torch.tensor(pad_rows(out["completion_ids"]))
    ids = torch.cat([left.clamp(min=0), right.clamp(min=0)], 1)
    mask = torch.cat([left >= 0, right >= 0], 1).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, right.shape[1], batch_size=len(ids))
    for i, lp in enumerate(out["logprobs"]):
        torch.testing.assert_close(torch.tensor(lp), logps[i, :len(lp)].float(), atol=2e-4,
                                   rtol=1e-4)


def test_reasoning_mode_rollouts_and_gated_reward(tiny):
    root, data, index, tok = tiny
    constraint = constraint_for(tok, index, "reasoning")
    end = constraint.eos_token_id
    fmt = ThinkFormat.from_tokenizer(tok)
    # the untrained model never writes <think>: an empty think marker lets rewards vary, so
    # the advantages are not all zero
    loose = ThinkFormat(fmt.answer, [], [], fmt.stop)
    prompts, targets = prompts_and_targets(data, index, tok, 4, seed=2, mode="reasoning")
    trainer = make_trainer(root, tok, constraint, prompts, targets, mode="reasoning", steps=1,
                           reward=gt.gated_reward_func(constraint, fmt=loose), think_budget=6,
                           temperature=0.8)
    trainer.train()
    (out, per_func), = trainer.record
    rows = completions(out)
    for r in rows:  # free text (at most the budget), the marker, a real item, the end token
        s = next(p + len(fmt.answer) for p in range(len(r)) if r[p:p + len(fmt.answer)] == fmt.answer)
        assert s - len(fmt.answer) <= 6 + 1 and r[-1] == end
        assert constraint.trie.lookup(np.array([r[s:]]))[0] >= 0
    assert_trl_logprobs(trainer, trainer.rollout_func(prompts[:2] * 2, trainer))
    rewards = per_func[:, 0]
    assert rewards.unique().numel() > 1
    torch.testing.assert_close(out["advantages"], group_advantage_reference(
        rewards, torch.arange(len(rewards)) // N, k=4), atol=1e-5, rtol=1e-5)


def test_bad_inputs(tiny):
    root, data, index, tok = tiny
    constraint = constraint_for(tok, index)
    # the constraint ends SIDs with <|im_end|>, reasoning mode needs </answer>'s first token
    with pytest.raises(InvalidInputError, match="ends SIDs with token .* reasoning mode expects"):
        gt.gream_rollout_func(constraint, tok, mode="reasoning")
    with pytest.raises(InvalidInputError, match="ends SIDs with token .* direct mode expects"):
        gt.gream_rollout_func(SIDConstraint(index, tok, eos_token_id=5), tok)
    # SID ids that are not the tokenizer's
    shifted = SIDConstraint(index, token_table=constraint.token_table + 1,
                            eos_token_id=constraint.eos_token_id)
    with pytest.raises(InvalidInputError, match="disagree on SID token"):
        gt.gream_rollout_func(shifted, tok)
    with pytest.raises(GreamError, match="supports trl >= 1.16.0"):
        gt.check_trl_version("1.20.0")
    # the same SID tokens, another item order: not the index the model was trained with
    perm = np.random.default_rng(0).permutation(index.num_items)
    other = SIDConstraint(SemanticIndex(index.codes[perm], index.extra[perm],
                                        index.codebook_size), tok,
                          eos_token_id=constraint.eos_token_id)
    prompts, targets = prompts_and_targets(data, index, tok, 2)
    with pytest.raises(InvalidInputError, match="is not the index .* allow_index_mismatch"):
        make_trainer(root, tok, other, prompts, targets, reward=gt.sid_reward_func(other))
    reward = gt.sid_reward_func(constraint)
    sid = constraint.trie.sequences()[0]
    sid = sid[sid >= 0].tolist()
    assert reward(completion_ids=[sid], target=[0]) == [1.0]
    with pytest.raises(InvalidInputError, match=r"completion 1: expected SID tokens .* got "
                                                r"token 7 at position 0"):
        reward(completion_ids=[sid, [7, constraint.eos_token_id]], target=[0, 0])
    assert gt.sid_reward_func(constraint, on_invalid="zero")(
        completion_ids=[sid, [7]], target=[0, 0]) == [1.0, 0.0]
    with pytest.raises(InvalidInputError, match=r"target\[0\] = 999"):
        reward(completion_ids=[sid], target=[999])
    with pytest.raises(InvalidInputError, match="column 'target'"):
        reward(completion_ids=[sid])


def test_example_script_runs(monkeypatch, tmp_path):
    """examples/trl_srpo.py --tiny: the README's TRL recipe, end to end."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "trl_srpo.py"
    monkeypatch.setattr("sys.argv", [str(script), "--tiny", "--steps", "1", "--prompts", "2",
                                     "--n", "2", "--out", str(tmp_path / "out")])
    runpy.run_path(str(script), run_name="__main__")
