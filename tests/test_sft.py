"""SFT: the chunked cross-entropy against torch, packing against one example at a time, the tiny
model and its tokenizer, a short run end to end (loss goes down, final/ evaluates), exact resume,
and the errors of bad inputs. Data: a small synthetic dataset, an index with a collision, and the
alignment + CoT rows mixed into a curriculum."""
import json

import pytest
import torch
import torch.nn.functional as F

from gream_fast import GreamError, InvalidInputError
from gream_fast.cli import main
from gream_fast.files import read_jsonl, write_jsonl
from gream_fast.train.loss import chunked_cross_entropy
from gream_fast.train.sft import SFTConfig, lr_factor, train

from tiny_data import K, LEVELS, make_data_and_index


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gream_fast.tasks.align import AlignConfig, AlignmentBuilder
    from gream_fast.tasks.context import TaskContext
    from gream_fast.tasks.curriculum import mix
    from gream_fast.tasks.reason import ReasonConfig, build_reasoning
    from gream_fast.tasks.teacher import TemplateTeacher

    root = tmp_path_factory.mktemp("sft")
    data, index = make_data_and_index(root, users=40)
    ctx = TaskContext(data, index)
    align = AlignmentBuilder(ctx, AlignConfig(passes=1, tasks="seqrec,item2index,index2item")).build()
    reason, _ = build_reasoning(ctx, TemplateTeacher(), ReasonConfig())
    rows = mix(align, reason, seed=0)
    write_jsonl(root / "sft.jsonl", rows)
    write_jsonl(root / "small.jsonl", rows[:8])
    return root, data, index, rows


@pytest.fixture(scope="module")
def tiny(setup, tmp_path_factory):
    from gream_fast.model.tiny import build_tiny

    root, data, index, _ = setup
    out = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = build_tiny(root / "data", index, out_dir=out, seed=0)
    return model, tokenizer, out


def tiny_cfg(root, out, **kw):
    # 8 rows -> 3 packed rows -> 3 micro-batches an epoch: 6 steps of 2 go round 4 epochs
    base = dict(init="tiny", data=str(root / "small.jsonl"), out=str(out),
                index=str(root / "index"), data_dir=str(root / "data"), seq_len=256,
                batch_size=1, grad_accum=2, max_steps=6, warmup_steps=2, save_every=0)
    return SFTConfig(**{**base, **kw})


# -- chunked cross-entropy --------------------------------------------------------------------
@pytest.mark.parametrize("n,h,v,chunk,ignored", [
    (37, 16, 50, 7, 0.4),      # ragged last chunk
    (64, 32, 301, None, 0.5),  # default chunk: one chunk
    (5, 8, 11, 1, 0.0),        # one row per chunk, nothing ignored
    (40, 8, 20, 3, 0.97),      # almost everything ignored
])
def test_chunked_ce_matches_torch(n, h, v, chunk, ignored):
    g = torch.Generator().manual_seed(n * v)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(v, h, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    labels[0] = 3  # at least one label
    loss, count = chunked_cross_entropy(hidden, weight, labels, chunk=chunk)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    ref.backward()
    assert count == int((labels != -100).sum())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(got[0], hidden.grad, atol=1e-5, rtol=0)
    assert torch.allclose(got[1], weight.grad, atol=1e-5, rtol=0)
    assert (got[0][labels == -100] == 0).all()  # ignored rows get no gradient


def test_chunked_ce_reductions_and_shapes():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 10, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (3, 10), generator=g)
    labels[:, :4] = -100
    total, n = chunked_cross_entropy(hidden, weight, labels, chunk=4, reduction="sum")
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 30), labels.reshape(-1), reduction="sum")
    assert n == 18 and total.item() == pytest.approx(ref.item(), rel=1e-6)
    # normalizer: gradient accumulation over micro-batches equals one big batch's mean
    a, _ = chunked_cross_entropy(hidden[:1], weight, labels[:1], normalizer=18)
    b, _ = chunked_cross_entropy(hidden[1:], weight, labels[1:], normalizer=18)
    (a + b).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (ref / 18).backward()
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, atol=1e-6)
    # no labels at all: zero loss, zero gradients
    hidden.grad = weight.grad = None
    none, n = chunked_cross_entropy(hidden, weight, torch.full((3, 10), -100))
    none.backward()
    assert n == 0 and none.item() == 0 and not hidden.grad.any() and not weight.grad.any()
    # no gradient wanted: the forward alone
    with torch.no_grad():
        assert chunked_cross_entropy(hidden, weight, labels)[0].item() == pytest.approx(
            ref.item() / 18, rel=1e-6)


@pytest.mark.parametrize("mode", ["autocast", "bf16_hidden"])
def test_chunked_ce_bfloat16(mode):
    """Matmuls in bfloat16 (autocast's dtype, or a bfloat16 hidden), log-sum-exp in float32:
    close to the float32 loss; gradients in their inputs' dtypes."""
    g = torch.Generator().manual_seed(7)
    h32 = torch.randn(48, 32, generator=g)
    weight = (0.3 * torch.randn(200, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 200, (48,), generator=g)
    labels[::3] = -100
    hidden = (h32 if mode == "autocast" else h32.bfloat16()).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == torch.float32
    ref_h, ref_w = h32.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.T, labels, ignore_index=-100)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    assert torch.allclose(hidden.grad.float(), ref_h.grad, atol=2e-3, rtol=5e-2)
    assert torch.allclose(weight.grad, ref_w.grad, atol=2e-3, rtol=5e-2)


def test_chunked_ce_errors():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        chunked_cross_entropy(hidden, weight, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(InvalidInputError, match="must agree"):
        chunked_cross_entropy(hidden, weight, torch.tensor([1, 2, 3]))
    with pytest.raises(InvalidInputError, match=r"expected \[vocab, 8\]"):
        chunked_cross_entropy(hidden, torch.randn(10, 7), torch.tensor([1, 2, 3, 4]))


# -- packing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_examples_alone(setup, tiny, attn):
    """Packed rows (positions restarting, attention confined to each example) give the loss the
    examples give one at a time through the plain HF forward: the sum over response tokens."""
    from gream_fast.tasks.chat import ChatEncoder
    from gream_fast.train.sft import encode_and_pack, packed_loss

    _, _, _, rows = setup
    model, tokenizer, _ = tiny
    model.eval().set_attn_implementation(attn)
    try:
        rows = rows[:12]
        packed, stats = encode_and_pack(rows, tokenizer, 256, progress=False)
        assert stats["packed_rows"] < len(rows)  # several examples share a row
        with torch.no_grad():
            batch = {k: packed[k] for k in ("input_ids", "position_ids", "seq_ids", "shift_labels")}
            total, count = packed_loss(model, batch, chunk=50, reduction="sum")
            ref_sum, ref_count = 0.0, 0
            for ex in ChatEncoder(tokenizer, max_length=256).encode_many(rows):
                logits = model(torch.tensor([ex["input_ids"]])).logits[0]
                labels = torch.tensor(ex["labels"][1:])
                ref_sum += F.cross_entropy(logits[:-1], labels, reduction="sum").item()
                ref_count += int((labels != -100).sum())
    finally:
        model.set_attn_implementation("sdpa")
    assert count == ref_count == stats["loss_tokens"]
    assert total.item() / count == pytest.approx(ref_sum / ref_count, abs=1e-5)


def test_history_loss_labels_prompt_sids(setup, tiny):
    """history_loss: every SID token of an example (prompt and response) is a label, each
    predicted by the token before it within its example; other tokens keep their labels."""
    from gream_fast.train.sft import IGNORE_INDEX, encode_and_pack, sid_token_ids

    _, _, _, rows = setup
    _, tokenizer, _ = tiny
    sids = sid_token_ids(tokenizer)
    assert len(sids) and all(tokenizer.convert_ids_to_tokens(int(i)).startswith("<|")
                             for i in sids)
    plain, _ = encode_and_pack(rows[:12], tokenizer, 256, progress=False)
    hist, stats = encode_and_pack(rows[:12], tokenizer, 256, progress=False, history_loss=True)
    assert torch.equal(plain["input_ids"], hist["input_ids"])
    ids, seq = hist["input_ids"], hist["seq_ids"]
    is_sid = torch.isin(ids, sids) & (seq >= 0)
    assert torch.equal(hist["labels"][is_sid], ids[is_sid])
    assert torch.equal(hist["labels"][~is_sid], plain["labels"][~is_sid])
    assert int((plain["labels"][is_sid] == IGNORE_INDEX).sum()) > 0  # prompts held SIDs
    shift = hist["shift_labels"]
    same = seq[:, 1:] == seq[:, :-1]
    assert torch.equal(shift[:, :-1][same], hist["labels"][:, 1:][same])
    assert (shift[:, :-1][~same] == IGNORE_INDEX).all()
    assert stats["loss_tokens"] == int((shift != IGNORE_INDEX).sum())


def test_lr_schedule():
    assert [lr_factor(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 14) == 1.0 and lr_factor(9, 4, 14) == pytest.approx(0.5)
    assert lr_factor(14, 4, 14) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(14, 4, 14, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10) == 1.0


# -- the tiny model ---------------------------------------------------------------------------
def test_tiny_model_and_tokenizer(setup, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gream_fast.index.tokens import is_contiguous, sid_token_table
    from gream_fast.model.tiny import TINY_SIZES, build_tiny

    root, data, index, _ = setup
    model, tokenizer, out = tiny
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tokenizer)
    assert {k: getattr(cfg, k) for k in TINY_SIZES["base"]} == TINY_SIZES["base"]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert len(tokenizer.encode(t, add_special_tokens=False)) == 1
    table = sid_token_table(tokenizer, index)
    assert is_contiguous(table) and table.max() == len(tokenizer) - 1
    ids = index.token_ids(tokenizer)
    for item in (0, 1, data.num_items - 1):  # 1 collides with 0: four tokens
        sid = "".join(index.sid(item))
        enc = tokenizer.encode(f"next: {sid}.", add_special_tokens=False)
        row = ids[item][ids[item] >= 0].tolist()
        assert any(enc[i:i + len(row)] == row for i in range(len(enc)))
        assert tokenizer.decode(row) == sid
    assert len(ids[1][ids[1] >= 0]) == LEVELS + 1
    # the item texts tokenize into words, not bytes
    title = data.items[0]["title"]
    assert len(tokenizer.encode(title, add_special_tokens=False)) <= len(title.split()) + 2
    # saved: loads with transformers; deterministic per seed
    again = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 model.state_dict().values()))
    same, tok2 = build_tiny(data, index, seed=0)
    other, _ = build_tiny(data, index, seed=1)
    assert tok2.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(same.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight,
                           model.model.layers[0].mlp.up_proj.weight)
    small, tok3 = build_tiny(data, index, seed=0, size="small")
    assert {k: getattr(small.config, k) for k in TINY_SIZES["small"]} == TINY_SIZES["small"]
    assert small.num_parameters() < model.num_parameters() / 2
    assert tok3.get_vocab() == tokenizer.get_vocab()  # the size changes the model only
    with pytest.raises(InvalidInputError, match="tiny size: expected one of base, small"):
        build_tiny(data, index, size="huge")


# -- training runs ----------------------------------------------------------------------------
def test_sft_overfits_and_final_evaluates(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gream_fast.eval import evaluate
    from gream_fast.model import HFRunner

    root, data, index, _ = setup
    run = tmp_path / "run"
    assert main(["train", "sft", "--init", "tiny", "--data", str(root / "small.jsonl"),
                 "--out", str(run), "--index", str(root / "index"), "--data-dir",
                 str(root / "data"), "--seq-len", "256", "--batch-size", "4", "--max-steps", "30",
                 "--warmup-steps", "3", "--save-every", "10", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 30 and summary["final"] == str(run / "final")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(metrics[0])
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert last < 0.3 * first, (first, last)
    config = json.loads((run / "sft_config.json").read_text())
    assert config["lr"] == 1e-3 and config["total_steps"] == 30  # lr 0 resolved for tiny
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    # HFRunner: the decoder runner's attention kernel runs in the Triton interpreter on CPU,
    # ~15 s here; what this checks is that final/ is a model evaluate() takes
    m = evaluate(model, tokenizer, data, index, ks=(1, 4), num_beams=4, max_users=3,
                 runner=HFRunner(model), progress=False)
    assert set(m) == {"recall@1", "ndcg@1", "recall@4", "ndcg@4"}

    # --model: continue from a HF folder that already has the SID tokens (no --index needed)
    cont = train(SFTConfig(model=str(run / "final"), data=str(root / "small.jsonl"),
                           out=str(tmp_path / "cont"), seq_len=256, batch_size=4, max_steps=1,
                           save_every=0, device="cpu"), progress=False)
    assert cont["steps"] == 1 and (tmp_path / "cont" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "cont" / "sft_config.json").read_text())["lr"] == 2e-5


def test_resume_is_exact(setup, tmp_path):
    from safetensors.torch import load_file

    root = setup[0]
    straight = train(tiny_cfg(root, tmp_path / "a"), progress=False)
    half = train(tiny_cfg(root, tmp_path / "b", stop_after=3), progress=False)
    assert half["steps"] == 3 and half["final"] is None
    assert not (tmp_path / "b" / "final").exists()
    ckpt = tmp_path / "b" / "checkpoint-3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["micro_batch"] == 6
    assert state["data"]["packed_rows"] < 6  # the 12 micro-batches wrap round the epochs
    assert load_file(ckpt / "optimizer.safetensors")  # tensors in safetensors, no pickle
    with pytest.raises(InvalidInputError, match="--resume"):  # the run exists
        train(tiny_cfg(root, tmp_path / "b"), progress=False)
    with pytest.raises(InvalidInputError, match="--lr"):  # resumed with other settings
        train(tiny_cfg(root, tmp_path / "b", lr=5e-4, resume=True), progress=False)
    rest = train(tiny_cfg(root, tmp_path / "b", resume=True), progress=False)
    assert rest["steps"] == straight["steps"] == 6
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    keys = ("step", "loss", "lr", "grad_norm", "loss_tokens")
    assert [[m[k] for k in keys] for m in ma] == [[m[k] for k in keys] for m in mb]


def test_bad_inputs(setup, tmp_path, capsys):
    root = setup[0]
    common = ["--out", str(tmp_path / "run"), "--index", str(root / "index"),
              "--data-dir", str(root / "data")]
    cases = [
        (["--init", "tiny", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--data", str(root / "sft.jsonl")], "give exactly one"),
        (["--init", "tiny", "--model", str(tmp_path), "--data", str(root / "sft.jsonl")],
         "give exactly one"),
        (["--model", str(tmp_path), "--data", str(root / "sft.jsonl")], "no config.json"),
        (["--init", "tiny", "--data", str(root / "sft.jsonl"), "--batch-size", "0"],
         "--batch-size: expected >= 1"),
        (["--init", "tiny", "--data", str(root / "sft.jsonl"), "--tiny-size", "huge"],
         "--tiny-size: expected one of base, small, got 'huge'"),
    ]
    for args, message in cases:
        assert main(["train", "sft", *common, *args]) == 2, args
        assert message in capsys.readouterr().err
    assert main(["train", "sft", "--init", "tiny", "--data", str(root / "sft.jsonl"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "--init tiny needs --index" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices
        main(["train", "sft", *common, "--init", "huge", "--data", str(root / "sft.jsonl")])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"nope": 1}\n')
    with pytest.raises(GreamError, match="bad.jsonl:2"):
        train(SFTConfig(init="tiny", data=str(bad), out=str(tmp_path / "x"),
                        index=str(root / "index"), data_dir=str(root / "data")), progress=False)


def test_model_without_sid_tokens(setup, tmp_path):
    """--model whose tokenizer lacks the SID tokens: an error without --index, trained with it."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from gream_fast.model.tiny import train_tokenizer

    root = setup[0]
    tokenizer = train_tokenizer(["the user bought an item"] * 10, vocab_size=300)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    args = dict(model=str(tmp_path / "plain"), data=str(root / "small.jsonl"), seq_len=256,
                batch_size=4, max_steps=1, save_every=0, device="cpu")
    with pytest.raises(InvalidInputError, match="no token '<\\|a_"):
        train(SFTConfig(out=str(tmp_path / "r1"), **args), progress=False)
    out = train(SFTConfig(out=str(tmp_path / "r2"), index=str(root / "index"), **args),
                progress=False)
    assert out["steps"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r2" / "final")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + (LEVELS + 1) * K


def test_gradient_checkpointing_changes_nothing(setup, tmp_path):
    from safetensors.torch import load_file

    root = setup[0]
    for name, flag in (("plain", False), ("ckpt", True)):
        train(tiny_cfg(root, tmp_path / name, max_steps=2, gradient_checkpointing=flag),
              progress=False)
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("plain", "ckpt"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    la, lb = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("plain", "ckpt"))
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], abs=1e-6)
