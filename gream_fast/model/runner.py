"""The decoder runner: a Qwen3 / Qwen2 / Llama causal LM run by us, not by `generate`.

It reuses the Hugging Face module's own weights and sub-modules (projections, norms, rotary
embedding, MLP) and replaces what HF's machinery costs in generation:
- prefill of a batch of prompts of mixed lengths, packed: the GEMMs see exactly the prompt
  tokens, only attention is per prompt (flash-attn varlen when installed, SDPA otherwise), and
  only each prompt's last position goes through the final norm;
- decode with a shared-prefix KV cache: a prompt's KV is stored once, however many beams or
  samples continue it; each row owns a small suffix buffer for the tokens it generated.
  Reordering beams moves suffix entries only (a few tokens), never prompt KV; the attention
  reads each prompt's KV once per step for all its rows (kernels/prefix_attention.py);
- heads: the full LM head, or only a slice of its rows (one SID level's tokens).
Other architectures go through `HFRunner`: the HF forward, slower but correct.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gream_fast.errors import InvalidInputError
from gream_fast.kernels.prefix_attention import shared_prefix_attention

SUPPORTED = ("llama", "qwen2", "qwen3")

try:  # optional extra: packed prefill without padding
    from flash_attn import flash_attn_varlen_func
except ImportError:  # the default here: SDPA
    flash_attn_varlen_func = None


def supports(model) -> bool:
    """Whether DecoderRunner runs this model (else use HFRunner)."""
    cfg = model.config
    sliding = any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
    return cfg.model_type in SUPPORTED and not sliding and hasattr(model, "model")


def group_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by prompt, counts[b] rows for prompt b -> (row_cu int32 [B+1], row_prompt
    int64 [R])."""
    row_cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=counts.device)
    row_cu[1:] = torch.cumsum(counts, 0)
    return row_cu, torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def pack_prompts(prompts, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids [T] int64, positions [T] int64, cu [B+1] int32)."""
    if len(prompts) == 0:
        raise InvalidInputError("prompts: expected at least one prompt")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise InvalidInputError(f"prompts: prompt {lens.index(0)} is empty")
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    return ids, positions, cu.to(device)


@dataclass
class KVState:
    """The cache of one generation batch.

    prefix_k/v: per layer [T, Hkv, D], prompt b at rows prefix_cu[b]:prefix_cu[b+1]; rows (beams
    or samples) are grouped by prompt, those of prompt b at row_cu[b]:row_cu[b+1]; suffix_k/v:
    [layers, R, S, Hkv, D], the first `steps` entries of each row written.
    """
    prefix_k: list
    prefix_v: list
    prefix_cu: torch.Tensor
    prompt_lens: torch.Tensor  # [B] int64
    row_cu: torch.Tensor
    row_prompt: torch.Tensor  # [R] int64
    suffix_k: torch.Tensor
    suffix_v: torch.Tensor
    steps: int = 0

    @property
    def rows(self) -> int:
        return self.suffix_k.shape[1]

    def reorder(self, parents: torch.Tensor) -> None:
        """Row r continues row parents[r] (of the same prompt): copy the suffixes, no prompt KV."""
        s = self.steps
        self.suffix_k[:, :, :s] = self.suffix_k[:, parents, :s]
        self.suffix_v[:, :, :s] = self.suffix_v[:, parents, :s]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (sorted, so rows stay grouped by prompt): finished rows leave."""
        self.suffix_k = self.suffix_k[:, keep]
        self.suffix_v = self.suffix_v[:, keep]
        self.row_cu, self.row_prompt = group_rows(
            torch.bincount(self.row_prompt[keep], minlength=len(self.prompt_lens)))


def rotate(x, cos, sin):
    """Rotary embedding (the rotate-half convention of the HF checkpoints): x [T, H, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rot * sin[:, None]


def varlen_causal_attention(q, k, v, cu, max_len: int, scale: float):
    """Causal attention within each packed sequence. q [T, Hq, D], k/v [T, Hkv, D]."""
    if flash_attn_varlen_func is not None and q.is_cuda:
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale,
                                      causal=True)
    b = cu.numel() - 1
    lens = (cu[1:] - cu[:-1]).long()
    if b == 1 or bool((lens == max_len).all()):  # equal lengths: a plain batched causal SDPA
        shape = (b, max_len)
        o = F.scaled_dot_product_attention(
            q.view(*shape, *q.shape[1:]).transpose(1, 2), k.view(*shape, *k.shape[1:]).transpose(1, 2),
            v.view(*shape, *v.shape[1:]).transpose(1, 2), is_causal=True, scale=scale,
            enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)
    # mixed lengths: pad for attention only (the GEMMs stay packed)
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None] < lens[:, None]  # [B, P]
    idx = (cu[:-1, None].long() + pos[None]).clamp(max=q.shape[0] - 1)

    def pad(t):
        return t[idx].transpose(1, 2)  # [B, H, P, D]

    mask = valid[:, None, None, :] & (pos[None, :] <= pos[:, None])[None, None]
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o.transpose(1, 2)[valid]


class DecoderRunner:
    """Prefill + shared-prefix decode for a Qwen3/Qwen2/Llama HF model (weights shared, not
    copied)."""

    def __init__(self, model):
        if not supports(model):
            raise InvalidInputError(
                f"DecoderRunner runs {', '.join(SUPPORTED)} without sliding-window layers; got "
                f"model_type {model.config.model_type!r} (use HFRunner)")
        self.model = model
        cfg = model.config
        self.config = cfg
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.scale = attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.lm_head = model.get_output_embeddings()

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def _rope(self, x, positions):
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0].to(x.dtype), sin[0].to(x.dtype)

    def _qkv(self, layer, h, cos, sin):
        a = layer.self_attn
        t = h.shape[0]
        q = a.q_proj(h).view(t, self.num_heads, self.head_dim)
        k = a.k_proj(h).view(t, self.num_kv_heads, self.head_dim)
        v = a.v_proj(h).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _block(self, layer, x, attend):
        """One decoder layer; attend(layer_index, q, k, v) -> attention output [T, Hq, D]."""
        h = layer.input_layernorm(x)
        o = attend(h)
        x = x + layer.self_attn.o_proj(o.reshape(x.shape[0], -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    @torch.no_grad()
    def prefill(self, prompts, rows_per_prompt, suffix_capacity: int):
        """Run the prompts (token-id lists), store their KV once, and allocate suffix buffers
        for rows_per_prompt rows each (an int, or one count per prompt). Returns (hidden
        [B, H] at each prompt's last position after the final norm, KVState)."""
        ids, positions, cu = pack_prompts(prompts, self.device)
        lens = (cu[1:] - cu[:-1]).long()
        max_len = int(lens.max())
        x = self.embed(ids)
        cos, sin = self._rope(x, positions)
        pk, pv = [], []
        for layer in self.layers:
            def attend(h, layer=layer):
                q, k, v = self._qkv(layer, h, cos, sin)
                pk.append(k)
                pv.append(v)
                return varlen_causal_attention(q, k, v, cu, max_len, self.scale)
            x = self._block(layer, x, attend)
        last = self.norm(x[cu[1:].long() - 1])
        counts = torch.as_tensor(rows_per_prompt, device=self.device).long().expand(len(prompts))
        row_cu, row_prompt = group_rows(counts)
        shape = (len(self.layers), len(row_prompt), suffix_capacity, self.num_kv_heads,
                 self.head_dim)
        state = KVState(pk, pv, cu, lens, row_cu, row_prompt,
                        torch.zeros(shape, dtype=self.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.dtype, device=self.device))
        return last, state

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, state: KVState) -> torch.Tensor:
        """Feed one token per row [R]; returns the rows' hidden states [R, H] (final norm)."""
        s = state.steps
        if s >= state.suffix_k.shape[2]:
            raise InvalidInputError(f"decode: suffix capacity {state.suffix_k.shape[2]} is full")
        x = self.embed(tokens)
        positions = state.prompt_lens[state.row_prompt] + s
        cos, sin = self._rope(x, positions)
        lens = torch.full((state.rows,), s + 1, dtype=torch.int32, device=x.device)
        for i, layer in enumerate(self.layers):
            def attend(h, i=i, layer=layer):
                q, k, v = self._qkv(layer, h, cos, sin)
                state.suffix_k[i, :, s] = k
                state.suffix_v[i, :, s] = v
                return shared_prefix_attention(q, state.prefix_k[i], state.prefix_v[i],
                                               state.prefix_cu, state.row_cu, state.suffix_k[i],
                                               state.suffix_v[i], lens, self.scale, check=False)
            x = self._block(layer, x, attend)
        state.steps = s + 1
        return self.norm(x)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Float32 logits over the whole vocabulary, or over LM-head rows `rows` only."""
        w = self.lm_head.weight if rows is None else self.lm_head.weight[rows]
        b = self.lm_head.bias
        if b is not None and rows is not None:
            b = b[rows]
        return F.linear(hidden, w, b).float()


@dataclass
class TokenState:
    """HFRunner's cache: the prompts and each row's generated tokens (it recomputes)."""
    prompts: list
    row_cu: torch.Tensor
    row_prompt: torch.Tensor
    generated: torch.Tensor  # [R, capacity]
    steps: int = 0

    @property
    def rows(self) -> int:
        return self.generated.shape[0]

    def reorder(self, parents: torch.Tensor) -> None:
        self.generated[:, :self.steps] = self.generated[parents, :self.steps]

    def select(self, keep: torch.Tensor) -> None:
        self.generated = self.generated[keep]
        self.row_cu, self.row_prompt = group_rows(
            torch.bincount(self.row_prompt[keep], minlength=len(self.prompts)))


class HFRunner:
    """The same interface on any HF causal LM: every step re-runs the model on each row's
    prompt + generated tokens (left-padded batch, no cache). Slower, correct, and fine for the
    few steps of a SID."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.lm_head = model.get_output_embeddings()

    @property
    def device(self):
        return self.lm_head.weight.device

    @torch.no_grad()
    def _last_hidden(self, seqs: list) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.int64, device=self.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.as_tensor(s)
            mask[i, width - len(s):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1][:, -1]

    def prefill(self, prompts, rows_per_prompt, suffix_capacity: int):
        pack_prompts(prompts, "cpu")  # validates
        prompts = [list(map(int, p)) for p in prompts]
        counts = torch.as_tensor(rows_per_prompt).long().expand(len(prompts)).to(self.device)
        row_cu, row_prompt = group_rows(counts)
        state = TokenState(prompts, row_cu, row_prompt,
                           torch.zeros(len(row_prompt), suffix_capacity, dtype=torch.int64,
                                       device=self.device))
        return self._last_hidden(prompts), state

    def decode(self, tokens: torch.Tensor, state: TokenState) -> torch.Tensor:
        s = state.steps
        if s >= state.generated.shape[1]:
            raise InvalidInputError(f"decode: suffix capacity {state.generated.shape[1]} is full")
        state.generated[:, s] = tokens
        state.steps = s + 1
        gen = state.generated[:, :s + 1].tolist()
        rows = [state.prompts[p] + g for p, g in zip(state.row_prompt.tolist(), gen)]
        return self._last_hidden(rows)

    logits = DecoderRunner.logits


def make_runner(model):
    """DecoderRunner where it supports the architecture, HFRunner otherwise."""
    return DecoderRunner(model) if supports(model) else HFRunner(model)


def bytes_per_prompt(runner, prompt_len: int, rows: int, steps: int) -> int:
    """Device memory one prompt needs in a generation batch: its KV (stored once), its rows'
    suffix KV, the prefill's widest activations and the rows' float32 logits."""
    cfg = runner.config
    item = runner.lm_head.weight.element_size()
    heads = cfg.num_attention_heads
    kv_token = 2 * cfg.num_hidden_layers * (getattr(cfg, "num_key_value_heads", None) or heads) * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) * item
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size  # other families
    act = prompt_len * (3 * cfg.hidden_size + 2 * inter) * item
    logits = rows * cfg.vocab_size * 4 * 3  # logits, log-softmax and top-k scratch
    return kv_token * (prompt_len + rows * steps) + act + logits


def plan_batches(runner, prompts, rows: int, steps: int, budget: int | None = None) -> list:
    """Split prompts into consecutive chunks whose memory (bytes_per_prompt) fits `budget`
    (default: 80% of the free device memory on CUDA, no limit on CPU). Never drops a prompt:
    one that alone exceeds the budget runs alone."""
    if budget is None:
        if runner.device.type != "cuda":
            return [slice(0, len(prompts))]
        free, _ = torch.cuda.mem_get_info(runner.device)
        budget = int(0.8 * free)
    chunks, start, used = [], 0, 0
    for i, p in enumerate(prompts):
        need = bytes_per_prompt(runner, len(p), rows, steps)
        if i > start and used + need > budget:
            chunks.append(slice(start, i))
            start, used = i, 0
        used += need
    chunks.append(slice(start, len(prompts)))
    return chunks
