"""`--init tiny`: a small Qwen3-architecture model with random weights and a byte-level BPE
tokenizer trained offline on the dataset's item texts and the task templates, with the ChatML and
SID tokens. The demo's backbone: it trains at thousands of tokens/s on a 2-core CPU.

Two sizes (TINY_SIZES), both with grouped-query attention (4 query heads, 2 KV heads) and q/k
norms as in Qwen3, so every code path of a real Qwen3 runs, RoPE base 10,000 (sequences are short)
and untied embeddings and LM head (~2 x vocab x hidden parameters, ~5.4k tokens on ML-100K):
- base: hidden 256, 4 layers, heads of 64 dims, MLP 768 (~3.2M parameters in the blocks);
  ~4.4k tokens/s of SFT on 2 CPU cores. The benchmarks' CPU model.
- small: hidden 128, 2 layers, heads of 32 dims, MLP 384 (~0.4M in the blocks); ~15k tokens/s.
  The demo's: in the same minutes it sees ~3.5x the targets, which on MovieLens-100K matters
  more than width (demo SFT, validation Recall@10: small, 500 + 500 steps at lr 2e-3 in 215 s:
  0.097; base, 150 + 150 steps at lr 1e-3 in 225 s: 0.057).
"""
from pathlib import Path

import torch

from gream_fast.errors import InvalidInputError

TINY_SIZES = {
    "base": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, intermediate_size=768),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=384),
}
EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (EOS, "<|im_start|>", "<|im_end|>", PAD)  # ids 0, 1, 2, 3


def tokenizer_corpus(dataset, max_users: int = 200) -> list:
    """Texts the tiny tokenizer learns its merges from: every item's title, description,
    categories and brand; the prompt templates of every task, the system prompt and the chat
    roles; the CoT layout; and the template teacher's reasoning, preference and intent texts for
    the first `max_users` users (its wording, with this dataset's categories and brands)."""
    from gream_fast.tasks.context import TaskContext
    from gream_fast.tasks.reason import REASON_PROMPTS, response
    from gream_fast.tasks.teacher import TemplateTeacher
    from gream_fast.tasks.templates import SYSTEM_PROMPT, TEMPLATES

    texts = []
    for it in dataset.items:
        texts += [it.get("title", ""), it.get("description", ""), it.get("brand", "")]
        texts += list(it.get("categories", []))
    fixed = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", *REASON_PROMPTS,
             response("steps", "history", "sid")]
    fixed += [t.prompt for pool in TEMPLATES.values() for t in pool]
    ctx, teacher = TaskContext(dataset), TemplateTeacher()
    histories, targets = [], []
    for s in dataset.sequences[:max_users]:
        train = s["items"][:-2]
        if len(train) >= 2:
            histories.append(train[-21:-1])
            targets.append(train[-1])
    if histories:
        texts += teacher.reasoning(ctx, histories, targets)
        texts += teacher.preference(ctx, histories) + teacher.intent(ctx, histories, targets)
    # the fixed wording appears in every row: weigh it like the item texts so its words merge
    return [t for t in texts if t] + fixed * 20


def train_tokenizer(texts, vocab_size: int = 4096):
    """A byte-level BPE (GPT-2 / Qwen style pre-tokenizer, no normalizer) trained on `texts`, as a
    transformers fast tokenizer with SPECIAL_TOKENS (EOS <|endoftext|>, ChatML, pad) and the
    ChatML chat template. Deterministic: the same texts give the same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gream_fast.tasks.chat import CHATML_TEMPLATE

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InvalidInputError(f"vocab_size: expected >= {256 + len(SPECIAL_TOKENS)} (the byte "
                                f"alphabet and the special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    out.chat_template = CHATML_TEMPLATE
    return out


def build_tiny(data_dir, index, out_dir=None, seed: int = 0, *, vocab_size: int = 4096,
               max_position_embeddings: int = 4096, size: str = "base",
               shape: dict | None = None):
    """(model, tokenizer): a Qwen3ForCausalLM of TINY_SIZES[size] (fields overridable with
    `shape`) with random float32 weights drawn from `seed`, and a tokenizer trained on the
    dataset at `data_dir` (a `data prepare` folder or a Dataset) with `vocab_size` BPE tokens,
    then the SID tokens of `index` (a SemanticIndex or its path) added with contiguous ids and
    the index recorded in the model's config (model.index_record).
    Saved to `out_dir` (safetensors + tokenizer files) when given. The global torch RNG is left
    untouched."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from gream_fast.data.dataset import Dataset
    from gream_fast.index.tokens import add_sid_tokens
    from gream_fast.model.index_record import attach
    from gream_fast.tasks.context import load_index

    if size not in TINY_SIZES:
        raise InvalidInputError(f"tiny size: expected one of {', '.join(TINY_SIZES)}, "
                                f"got {size!r}")
    data = data_dir if isinstance(data_dir, Dataset) else Dataset.load(data_dir)
    if not hasattr(index, "token_strings"):
        index = load_index(index)
    if index.num_items != data.num_items:
        raise InvalidInputError(f"the index has {index.num_items} items but the dataset "
                                f"{data.num_items}: they must describe the same items")
    tokenizer = train_tokenizer(tokenizer_corpus(data), vocab_size)
    add_sid_tokens(tokenizer, index=index)
    cfg = Qwen3Config(vocab_size=len(tokenizer), **{**TINY_SIZES[size], **(shape or {})},
                      max_position_embeddings=max_position_embeddings,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    attach(model, index)  # the index it was built for (model.index_record)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir is not None:
        from gream_fast.files import atomic_dir

        with atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return model, tokenizer
