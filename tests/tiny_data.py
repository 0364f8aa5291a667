"""A small synthetic dataset and a SemanticIndex with a collision, shared by the training and
evaluation tests (written once per test module)."""
import numpy as np

from gream_fast.data import Dataset
from gream_fast.data.prepare import prepare, write
from gream_fast.data.synth import SynthConfig, synthesize
from gream_fast.index import SemanticIndex

LEVELS, K = 3, 4


def make_data_and_index(root, users: int = 40):
    """root/data (a `data prepare` folder) and root/index (index.safetensors) -> (data, index)."""
    write(prepare(synthesize(SynthConfig(users=users, items=14, mean_length=8, seed=3)), k_core=3),
          root / "data")
    data = Dataset.load(root / "data")
    codes = np.random.default_rng(0).integers(0, K, (data.num_items, LEVELS))
    codes[1] = codes[0]  # a collision: SIDs of LEVELS and LEVELS + 1 tokens
    index = SemanticIndex.from_codes(codes, K)
    (root / "index").mkdir()
    index.save(root / "index" / "index.safetensors")
    return data, index


def train_chat_tokenizer():
    """A ByteLevel BPE trained offline on the prompts' words, Qwen-like special tokens (EOS
    <|endoftext|> differs from the end-of-turn <|im_end|>), no chat template (ChatML is used)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gream_fast.tasks.templates import SYSTEM_PROMPT, TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [SYSTEM_PROMPT, "user\n", "assistant\n", "system\n"] + [
        t.prompt for t in TEMPLATES["seqrec"]] * 5
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_tiny_model(root, index):
    """root/model: a tiny random Qwen3 with the index's SID tokens (float32, eval mode), and
    root/plain: the same without SID tokens (for the error cases) -> (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from gream_fast.index import add_sid_tokens

    tokenizer = train_chat_tokenizer()
    tokenizer.save_pretrained(root / "plain")  # no SID tokens: for the error case
    add_sid_tokens(tokenizer, index=index)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                      initializer_range=0.15, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    model.save_pretrained(root / "plain")
    return model, tokenizer
