"""integrations/vllm.py: TrieMask (the library-free core) against PrefixTrie on random tries,
the constraint file, and the two adapters driven through vLLM's real interfaces (0.24: V1;
0.34: model runner V2), each in a subprocess with the unpacked vLLM on its path. A GPU test runs
vllm.LLM end to end on a tiny model."""
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gream_fast import GreamError, InvalidInputError
from gream_fast.errors import FormatError
from gream_fast.generate import SIDConstraint
from gream_fast.generate.marker import MarkerAutomaton
from gream_fast.index.semantic_index import SemanticIndex
from gream_fast.integrations import vllm as gv
from gream_fast.model.index_record import index_record
from vllm_driver import MARKER, check_rows, expected_allowed

ROOT = Path(__file__).resolve().parents[1]
VLLM_DIRS = {"v1": ROOT / ".venv" / "vllm-0.24.0", "v2": ROOT / ".venv" / "vllm-0.34.0"}
END = 1


# -- random tries with a token-text vocabulary --------------------------------------------------
PIECES = ["<", "ans", "wer", ">", " <answer>", "x<answer>", "answer><a", "nswer>", "<answ", "er>"]
SPELLINGS = [[0, 1, 2, 3], [4], [5], [8, 9], [0, 6, 7], [0, 1, 8, 9]]  # indices into PIECES


def random_world(seed, vocab=70):
    """(constraint, automaton, texts): random codes with collisions (SIDs of L and L + 1
    tokens), SID tokens at random non-contiguous ids, end token END; ids vocab-10.. spell
    PIECES of the marker, the rest random short texts."""
    rng = np.random.default_rng(seed)
    levels, k = int(rng.integers(2, 4)), int(rng.integers(3, 6))
    codes = rng.integers(0, k, size=(int(rng.integers(8, 30)), levels))
    codes[1] = codes[0]  # at least one collision
    seen = {}
    keep = [seen.setdefault(tuple(c), []).append(i) or len(seen[tuple(c)]) <= min(k, 3)
            for i, c in enumerate(codes.tolist())]
    index = SemanticIndex.from_codes(codes[keep], k)  # at most 3 items share codes
    ids = rng.permutation(np.arange(2, vocab - len(PIECES)))[:(levels + 1) * k]
    constraint = SIDConstraint(index, token_table=ids.reshape(levels + 1, k), eos_token_id=END)
    r = random.Random(seed)
    texts = [r.choice(["a", "b", " ", "\n", "ok", "", "<", "r>"]) for _ in range(vocab)]
    texts[vocab - len(PIECES):] = PIECES
    for i in ids.tolist() + [END]:
        texts[i] = f"<|{i}|>"
    return constraint, MarkerAutomaton.from_texts(MARKER, texts), texts


def simulate(mask, constraint, texts, modes, steps, seed, widths=(1, 1, 1, 2, 0)):
    """Random generations fed to `mask` (slot r = logits row r): each step the masks are checked
    against the oracle from the generated tokens alone, then each slot gets 0-2 new tokens
    (allowed ones when masked; free text, often a spelling of the marker, otherwise). Returns
    the outputs."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    decode = lambda ids: "".join(texts[i] for i in ids)
    outs, queued = [[] for _ in modes], [[] for _ in modes]
    base = len(texts) - len(PIECES)
    for step in range(steps):
        logits = torch.randn(len(modes), len(texts) + 5, generator=gen)
        wants = [expected_allowed(constraint.trie, decode, m, o) for m, o in zip(modes, outs)]
        for r, want in enumerate(wants):  # untouched rows keep even NaN and inf bit for bit
            if want is None:
                logits[r, rng.randrange(logits.shape[1])] = rng.choice([torch.nan, -torch.inf])
        before = logits.clone()
        check_rows(before, mask.apply(logits), wants, f"step {step}")
        new = []
        for r, m in enumerate(modes):
            toks = []
            for _ in range(rng.choice(widths)):
                want = expected_allowed(constraint.trie, decode, m, outs[r] + toks)
                if want:
                    toks.append(rng.choice(sorted(want)))
                    continue
                if not queued[r] and rng.random() < 0.4:
                    queued[r] = [base + i for i in rng.choice(SPELLINGS)]
                toks.append(queued[r].pop(0) if queued[r] else rng.randrange(len(texts)))
            outs[r] += toks
            new.append(toks + [-1] * (2 - len(toks)))
        mask.advance(list(range(len(modes))), torch.tensor(new))
    return outs


@pytest.mark.parametrize("seed", range(4))
def test_masks_match_the_trie_in_both_modes(seed):
    constraint, auto, texts = random_world(seed)
    modes = ["direct", "reasoning", None, "direct", "reasoning", "reasoning", None, "direct"]
    mask = gv.TrieMask(constraint, num_slots=len(modes), automaton=auto)
    mask.reset(range(len(modes)), modes)
    outs = simulate(mask, constraint, texts, modes, steps=16, seed=seed)
    end = constraint.eos_token_id
    decode = lambda ids: "".join(texts[i] for i in ids)
    finished = {"direct": 0, "reasoning": 0}
    for m, o in zip(modes, outs):  # a finished SID is a real item (then free text)
        start = 0 if m != "reasoning" else next(
            (k for k in range(1, len(o) + 1) if MARKER in decode(o[:k])), len(o))
        if m is not None and end in o[start:]:
            sid = o[start:start + o[start:].index(end) + 1]
            assert constraint.trie.lookup(np.array([sid]))[0] >= 0
            finished[m] += 1
    assert finished["direct"] and finished["reasoning"], finished


def test_sid_start_rule():
    """Direct: the first generated token is masked. Reasoning: nothing until the marker is
    complete, split across tokens or not; then the root's children."""
    texts = ["<", "ans", "wer", ">", "x", " <answer>", "r><a", "nswer>"]
    texts += [f"<|{i}|>" for i in range(8, 16)]
    index = SemanticIndex.from_codes(np.array([[0, 1], [1, 0], [1, 1]]), 2)
    constraint = SIDConstraint(index, token_table=np.arange(8, 14).reshape(3, 2),
                               eos_token_id=4)
    auto = MarkerAutomaton.from_texts(MARKER, texts)
    mask = gv.TrieMask(constraint, 4, auto)
    mask.reset([0, 1, 2, 3], ["direct", "reasoning", "reasoning", "reasoning"])
    root = torch.tensor(sorted(constraint.trie.allowed(np.array([], dtype=np.int64)).tolist()))

    def masked():
        out = mask.apply(torch.zeros(4, len(texts)))
        return [bool(torch.isinf(row).any()) for row in out]

    assert masked() == [True, False, False, False]
    # slot 1: "<" "ans" "wer" ">"; slot 2: "x" "<" "ans" "wer" "r><a" "nswer>"; slot 3: " <answer>"
    mask.advance([1, 2, 3], torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2], [5, -1, -1, -1]]))
    assert masked() == [True, True, False, True]  # "...wer" then "r><a": not yet for slot 2
    mask.advance([2], torch.tensor([[6, 7]]))
    assert masked() == [True, True, True, True]
    out = mask.apply(torch.zeros(4, len(texts)))
    assert torch.equal(torch.nonzero(torch.isfinite(out[2])).flatten(), root)


def test_slot_reuse_resets_and_moves_carry_state():
    constraint, auto, texts = random_world(7)
    mask = gv.TrieMask(constraint, 3, auto)
    mask.reset([0, 1, 2], "direct")
    sid = constraint.trie.sequences()[0]
    sid = sid[sid >= 0].tolist()
    mask.advance([0, 1], torch.tensor([sid[:1], sid[:1]]))
    mask.reset([1], "reasoning")  # a new request in slot 1: waiting for its marker again
    wants = [set(constraint.trie.allowed(np.array(sid[:1])).tolist()), None,
             set(constraint.trie.allowed(np.array([], dtype=np.int64)).tolist())]
    logits = torch.randn(3, len(texts))
    check_rows(logits.clone(), mask.apply(logits), wants)
    mask.move([2, 0, -1])  # slot 0 <- 2, slot 1 <- 0, slot 2 emptied (OFF)
    logits = torch.randn(3, len(texts))
    check_rows(logits.clone(), mask.apply(logits), [wants[2], wants[0], None])
    # rows of slot -1 (no request) are untouched
    logits = torch.randn(2, len(texts))
    check_rows(logits.clone(), mask.apply(logits, slots=torch.tensor([-1, 1])), [None, wants[0]])


def test_off_trie_token_ends_the_constraint():
    constraint, auto, texts = random_world(3)
    mask = gv.TrieMask(constraint, 1, auto)
    mask.reset([0], "direct")
    not_child = next(t for t in range(len(texts))
                     if t not in constraint.trie.allowed(np.array([], dtype=np.int64)))
    mask.advance([0], torch.tensor([not_child]))
    logits = torch.randn(1, len(texts))
    check_rows(logits.clone(), mask.apply(logits), [None])


# -- the constraint file ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A byte-level BPE with SID tokens, a constraint closed by the first token of </answer>,
    saved with its marker automaton, and the tokenizer file the drivers decode with."""
    from gream_fast.index.tokens import add_sid_tokens
    from gream_fast.model.tiny import train_tokenizer
    from gream_fast.tasks.reason import response

    rng = random.Random(0)
    words = "the user bought a guitar then strings answer recommended product is".split()
    tok = train_tokenizer([response(" ".join(rng.choices(words, k=12)),
                                    " ".join(rng.choices(words, k=6)), "x") for _ in range(200)],
                          vocab_size=400)
    codes = np.random.default_rng(1).integers(0, 4, size=(24, 3))
    codes[1] = codes[0]
    codes = np.unique(codes, axis=0)
    codes = np.concatenate([codes, codes[:2]])  # collisions: SIDs of 3 and 4 tokens
    index = SemanticIndex.from_codes(codes, 4)
    add_sid_tokens(tok, index=index)
    end = tok("</answer>", add_special_tokens=False)["input_ids"][0]
    constraint = SIDConstraint(index, tok, eos_token_id=end)
    folder = tmp_path_factory.mktemp("vllm")
    gv.save_constraint(constraint, folder / "constraint.safetensors", tok)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return SimpleNamespace(tok=tok, constraint=constraint, folder=folder,
                           path=folder / "constraint.safetensors")


def test_save_load_round_trip(world, tmp_path):
    constraint, auto = gv.load_constraint(world.path)
    assert np.array_equal(constraint.token_table, world.constraint.token_table)
    assert constraint.eos_token_id == world.constraint.eos_token_id
    assert np.array_equal(constraint.trie.sequences(), world.constraint.trie.sequences())
    assert auto.marker == MARKER
    assert torch.equal(auto.table, MarkerAutomaton.from_tokenizer(world.tok, MARKER).table)
    gv.save_constraint(world.constraint, tmp_path / "plain.safetensors")  # no tokenizer
    plain, none = gv.load_constraint(tmp_path / "plain.safetensors")
    assert none is None and plain.num_items == world.constraint.num_items
    mask = gv.TrieMask(plain, 2)
    mask.reset([0], "direct")
    with pytest.raises(InvalidInputError, match="save_constraint"):
        mask.reset([1], "reasoning")


def test_bad_inputs(world, tmp_path):
    with pytest.raises(InvalidInputError, match=r'gream_mode.*"direct" or "reasoning"') as e:
        gv.request_mode(SimpleNamespace(extra_args={"gream_mode": "beam"}))
    assert isinstance(e.value, ValueError)  # what vLLM turns into a failed request
    assert gv.request_mode(SimpleNamespace(extra_args=None)) is None
    assert gv.request_mode(SimpleNamespace(extra_args={"gream_mode": "reasoning"})) == "reasoning"
    with pytest.raises(FormatError, match="missing.safetensors: no such file"):
        gv.load_constraint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(FormatError, match="junk.safetensors: not a readable safetensors"):
        gv.load_constraint(tmp_path / "junk.safetensors")
    with pytest.raises(GreamError, match=r'additional_config\["gream_constraint"\]'):
        gv._mask_from_config(SimpleNamespace(additional_config={}), 4, "cpu")
    mask = gv._mask_from_config(SimpleNamespace(additional_config={
        "gream_constraint": str(world.path)}), 4, "cpu")
    # a model whose config records another index (model.index_record) is refused
    index = world.constraint.index
    other = SemanticIndex(index.codes[::-1].copy(), index.extra[::-1].copy(), index.codebook_size)
    model = SimpleNamespace(hf_config=SimpleNamespace(gream_index=index_record(other)))
    with pytest.raises(InvalidInputError, match="is not the index .*gream_allow_index_mismatch"):
        gv._mask_from_config(SimpleNamespace(additional_config={
            "gream_constraint": str(world.path)}, model_config=model), 4, "cpu")
    model.hf_config.gream_index = index_record(index)
    gv._mask_from_config(SimpleNamespace(additional_config={
        "gream_constraint": str(world.path)}, model_config=model), 4, "cpu")
    with pytest.raises(InvalidInputError, match=r"logits: expected \[rows, V\] with V >="):
        mask.apply(torch.zeros(4, 10))
    with pytest.raises(InvalidInputError, match="mode"):
        mask.reset([0], "beam")
    with pytest.raises(InvalidInputError, match="slots"):
        mask.reset([9], "direct")
    other = SIDConstraint(world.constraint.index, token_table=world.constraint.token_table + 1,
                          eos_token_id=world.constraint.eos_token_id)
    with pytest.raises(InvalidInputError, match="SID token ids differ"):
        gv.save_constraint(other, tmp_path / "x.safetensors", world.tok)


def test_import_does_not_need_vllm():
    code = ("import sys, gream_fast, gream_fast.integrations.vllm as m\n"
            "assert 'vllm' not in sys.modules and m.TrieMask\n"
            "try:\n    m.SIDTrieLogitsProcessorV1\nexcept ImportError as e:\n"
            "    assert 'needs vLLM' in str(e), e\n    print('no vllm')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    if importlib.util.find_spec("vllm") is None:
        assert "no vllm" in res.stdout


# -- the real vLLM interfaces, driven as the engine drives them ---------------------------------
@pytest.fixture(scope="module")
def drivers(world):
    """Both drivers start at once (each spends most of its ~10 s importing vLLM)."""
    procs = {}
    for which, folder in VLLM_DIRS.items():
        if folder.is_dir():
            path = os.pathsep.join([str(folder), str(ROOT), str(ROOT / "tests")])
            env = {**os.environ, "PYTHONPATH": path, "VLLM_LOGGING_LEVEL": "WARNING"}
            procs[which] = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "vllm_driver.py"), which, str(world.folder)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_real_interface(which, drivers):
    if which not in drivers:
        pytest.skip(f"{VLLM_DIRS[which]} is missing (make install unpacks vLLM's interfaces)")
    out, _ = drivers[which].communicate(timeout=300)
    assert drivers[which].returncode == 0, f"the {which} driver failed:\n{out[-6000:]}"
    assert f"ok {which}:" in out, out[-3000:]


# -- end to end on a GPU ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_vllm_generates_real_items(mode, tmp_path):
    """A tiny Qwen3 saved to disk, served by vllm.LLM with the processor: every one of the n=8
    samples per prompt is a real item closed by the end token. Reasoning mode: "<answer>" is
    one added token with a logit bias, so the random model writes a little text, then the
    marker, then the SID (the marker split by BPE is test_marker's and the drivers' job)."""
    vllm = pytest.importorskip("vllm")
    from gream_fast.model.tiny import build_tiny
    from tiny_data import make_data_and_index

    _, index = make_data_and_index(tmp_path)
    model, tok = build_tiny(tmp_path / "data", index, size="small")
    if mode == "reasoning":
        tok.add_tokens([MARKER])
        model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    end = (tok.eos_token_id if mode == "direct"
           else tok("</answer>", add_special_tokens=False)["input_ids"][0])
    constraint = SIDConstraint(index, tok, eos_token_id=end)
    gv.save_constraint(constraint, tmp_path / "sid.safetensors", tok)
    proc = (gv.SIDTrieLogitsProcessor if mode == "direct"
            else "gream_fast.integrations.vllm:SIDTrieLogitsProcessor")
    llm = vllm.LLM(model=str(tmp_path / "model"), logits_processors=[proc],
                   additional_config={"gream_constraint": str(tmp_path / "sid.safetensors")},
                   dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.25,
                   max_model_len=512, max_num_seqs=64, seed=0)
    extra = {"gream_mode": mode}
    if mode == "direct":
        params = vllm.SamplingParams(n=8, temperature=1.0, max_tokens=constraint.max_len + 2,
                                     extra_args=extra, seed=0)
    else:
        marker = tok.convert_tokens_to_ids(MARKER)
        params = vllm.SamplingParams(n=8, temperature=1.0, max_tokens=96, extra_args=extra,
                                     logit_bias={marker: 8.0}, stop_token_ids=[end], seed=0)
    prompts = ["The user bought items in this order. Recommend the next one.",
               "Purchase history: a guitar, strings, a tuner. What next?"]
    outputs = [c for r in llm.generate(prompts, params) for c in r.outputs]
    del llm
    assert len(outputs) == 8 * len(prompts)
    answered = 0
    for c in outputs:
        ids = list(c.token_ids)
        start = 0
        if mode == "reasoning":
            start = next((k + 1 for k in range(len(ids)) if MARKER in tok.decode(ids[:k + 1])),
                         None)
            if start is None:  # no marker in 96 tokens: possible, rare with the bias
                continue
        body = ids[start:]
        if body and body[-1] == end:
            body = body[:-1]
        else:  # vLLM may leave the stop token out of token_ids
            assert c.finish_reason == "stop", (ids, c.finish_reason)
        assert body and constraint.trie.lookup(np.array([body + [end]]))[0] >= 0, (mode, ids)
        answered += 1
    assert answered >= len(outputs) - 2
