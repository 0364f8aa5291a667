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
- a static decode step: everything a step reads or advances (token inputs, suffix lengths,
  positions, rope tables, the row grouping) lives in buffers sized at prefill and updated in
  place, so a step has fixed shapes for a given row count and no host sync; on CUDA the runner
  can capture it in a CUDA graph per row count and replay it (cuda_graphs=True);
- for a server, a KVPool (reserve()): those buffers sized once for the largest batch and reused
  by every batch that fits, so a graph captured at warm-up serves every later batch of its
  shape (freeze() stops further captures);
- heads: the full LM head, or only a slice of its rows (one SID level's tokens).
Other architectures go through `HFRunner`: the HF forward, slower but correct.
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gream_fast.errors import InvalidInputError
from gream_fast.kernels.prefix_attention import CPUPlan, cpu_plan, shared_prefix_attention
from gream_fast.model import fused_cpu
from gream_fast.profiling import phase

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


class KVState:
    """The cache of one generation batch, in buffers sized at prefill for `capacity` rows and
    `suffix_capacity` steps; the live rows are the first `rows` of each row buffer.

    prefix_k/v: per layer [T, Hkv, D], prompt b at rows prefix_cu[b]:prefix_cu[b+1]; rows (beams
    or samples) are grouped by prompt, those of prompt b at row_cu[b]:row_cu[b+1]; suffix_k/v:
    [layers, capacity, S, Hkv, D], the first `steps` entries of each live row written.
    Everything is updated in place (reorder, select, decode), never reallocated: a captured
    CUDA graph keeps reading the same addresses.
    """

    def __init__(self, prefix_k, prefix_v, prefix_cu, prompt_lens, row_prompt, suffix_k,
                 suffix_v, rope_cos, rope_sin):
        self.prefix_k, self.prefix_v, self.prefix_cu = prefix_k, prefix_v, prefix_cu
        self.prompt_lens = prompt_lens  # [B] int64
        self.suffix_k, self.suffix_v = suffix_k, suffix_v
        self.rope_cos, self.rope_sin = rope_cos, rope_sin  # [positions, D], rows by position
        cap, dev = suffix_k.shape[1], prompt_lens.device
        self.row_cu = torch.zeros(len(prompt_lens) + 1, dtype=torch.int32, device=dev)
        self._row_prompt = torch.zeros(cap, dtype=torch.int64, device=dev)
        self.tokens = torch.zeros(cap, dtype=torch.int64, device=dev)  # a step's inputs
        self.lens = torch.zeros(cap, dtype=torch.int32, device=dev)  # suffix entries written
        self.start_pos = torch.zeros(cap, dtype=torch.int64, device=dev)  # a row's 1st position
        # flat index of entry 0 of row r in a layer's [capacity * S, Hkv, D] suffix view
        self.slot0 = torch.arange(cap, device=dev) * suffix_k.shape[2]
        self.graphs = {}  # rows -> (CUDAGraph, its output), see DecoderRunner
        self.pool = None  # the KVPool whose buffers these are, if any
        self.restart(row_prompt, prefix_k[0].shape[0])

    def restart(self, row_prompt, prefix_tokens: int, prefix_cu=None, prompt_lens=None) -> None:
        """Begin a batch in these buffers: rows row_prompt (grouped by prompt), no entries yet,
        the prompts' KV in the first prefix_tokens entries of prefix_k/v; a pooled state also
        takes the batch's prompt offsets and lengths (same prompt count), written in place."""
        if prefix_cu is not None:
            self.prefix_cu.copy_(prefix_cu)
            self.prompt_lens.copy_(prompt_lens)
        n = len(row_prompt)
        self.prefix_tokens = prefix_tokens
        self._row_prompt[:n] = row_prompt
        self.lens.zero_()
        self.start_pos[:n] = self.prompt_lens[row_prompt]
        self.num_rows, self.steps = n, 0
        self._regroup()

    @property
    def rows(self) -> int:
        return self.num_rows

    @property
    def row_prompt(self) -> torch.Tensor:
        return self._row_prompt[:self.num_rows]

    def _regroup(self) -> None:
        """row_cu from row_prompt, in place; index_add_ rather than bincount: no host sync."""
        self._layout_plan = None
        counts = torch.zeros(len(self.prompt_lens), dtype=torch.int64, device=self.row_cu.device)
        counts.index_add_(0, self.row_prompt, torch.ones_like(self.row_prompt))
        self.row_cu[1:] = torch.cumsum(counts, 0)

    def cpu_plan(self) -> CPUPlan:
        """The CPU attention's plan for this step (after its entry was counted): what comes
        from the prompts and rows is derived once per batch layout (restart, select), and
        every live row holds steps + 1 suffix entries (rows advance together), so no row's
        suffix is masked."""
        if self._layout_plan is None:
            self._layout_plan = cpu_plan(self.prefix_cu, self.row_cu, self.lens[:self.num_rows],
                                         self.prefix_k[0].dtype)
        return dataclasses.replace(self._layout_plan, S=self.steps + 1)

    def reorder(self, parents: torch.Tensor) -> None:
        """Row r continues row parents[r] (of the same prompt): copy the suffixes, no prompt KV."""
        n, s = self.num_rows, self.steps
        self.suffix_k[:, :n, :s] = self.suffix_k[:, parents, :s]
        self.suffix_v[:, :n, :s] = self.suffix_v[:, parents, :s]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (sorted, so rows stay grouped by prompt): finished rows leave.
        The kept rows move to the front of the buffers (the gather copies before the write):
        only the entries written so far, and on the CPU (where asking is free) only from the
        first row that moves."""
        n, s = keep.numel(), self.steps
        first = 0
        if not keep.is_cuda:
            moved = torch.nonzero(keep != torch.arange(n))
            first = int(moved[0]) if len(moved) else n
        for buf in (self.suffix_k, self.suffix_v):
            buf[:, first:n, :s] = buf[:, keep[first:], :s]
        for buf in (self._row_prompt, self.lens, self.start_pos):
            buf[:n] = buf[keep]
        self.num_rows = n
        self._regroup()

    def rewind(self, steps: int = 0) -> None:
        """Forget the entries after `steps` (benchmarks repeat one step this way)."""
        self.steps = steps
        self.lens.fill_(steps)


class KVPool:
    """Decode buffers sized once (a server's start-up) and reused by every generation batch
    that fits them: at most `prompts` prompts of at most `prompt_len` tokens each, `rows` rows,
    `suffix_capacity` generated tokens per row. A batch of B prompts always gets the same
    KVState (one per B, its buffers views of the pool's, the prompts' KV the first B x
    prompt_len entries), so the CUDA graph that state captured for n rows is replayed by every
    later batch of B prompts and n rows, whatever its prompts hold: a server captures once per
    (batch bucket, rows) at warm-up, never per batch. One batch at a time: a pooled state is
    valid until the next prefill that uses the pool. A batch that does not fit runs on buffers
    of its own (counted in `misses`)."""

    def __init__(self, runner, prompts: int, prompt_len: int, rows: int, suffix_capacity: int):
        if min(prompts, prompt_len, rows, suffix_capacity) < 1:
            raise InvalidInputError(f"KVPool: every size must be >= 1, got prompts={prompts}, "
                                    f"prompt_len={prompt_len}, rows={rows}, "
                                    f"suffix_capacity={suffix_capacity}")
        layers, hkv, d = len(runner.layers), runner.num_kv_heads, runner.head_dim
        like = dict(dtype=runner.dtype, device=runner.device)
        self.prompts, self.prompt_len, self.rows = prompts, prompt_len, rows
        self.suffix_capacity = suffix_capacity
        tokens = prompts * prompt_len
        self.prefix_k = [torch.zeros(tokens, hkv, d, **like) for _ in range(layers)]
        self.prefix_v = [torch.zeros(tokens, hkv, d, **like) for _ in range(layers)]
        self.suffix_k = torch.zeros(layers, rows, suffix_capacity, hkv, d, **like)
        self.suffix_v = torch.zeros_like(self.suffix_k)
        # rope for every position a row can reach
        self.rope_cos, self.rope_sin = runner._rope(
            self.suffix_k[0, 0, 0], torch.arange(prompt_len + suffix_capacity,
                                                 device=runner.device))
        self.states = {}  # prompt count -> KVState
        self.misses = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.prefix_k, *self.prefix_v, self.suffix_k, self.suffix_v))

    def fits(self, prompts: int, longest: int, rows: int, suffix_capacity: int) -> bool:
        return (prompts <= self.prompts and longest <= self.prompt_len
                and rows <= self.rows and suffix_capacity <= self.suffix_capacity)

    def take(self, keys, values, cu, lens, row_prompt) -> KVState:
        """The pooled state of len(lens) prompts, restarted for this batch: its prompts' KV
        (per layer [T, Hkv, D]) copied into the pool."""
        t, b = keys[0].shape[0], len(lens)
        for pool, new in zip((*self.prefix_k, *self.prefix_v), (*keys, *values)):
            pool[:t].copy_(new)
        state = self.states.get(b)
        if state is None:  # its prompts' KV: views as long as b prompts of prompt_len can be
            end = b * self.prompt_len
            state = self.states[b] = KVState(
                [k[:end] for k in self.prefix_k], [v[:end] for v in self.prefix_v], cu.clone(),
                lens.clone(), row_prompt, self.suffix_k, self.suffix_v, self.rope_cos,
                self.rope_sin)
            state.pool = self
        state.restart(row_prompt, t, cu, lens)
        return state


def rotate(x, cos, sin):
    """Rotary embedding (the rotate-half convention of the HF checkpoints): x [T, H, D]."""
    if fused_cpu.usable(x, cos, sin):
        return fused_cpu.rotary(x, cos, sin)
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


def rms_norm(norm, x):
    """norm(x) for the RMSNorm of Qwen3 / Qwen2 / Llama as one fused op (7 elementwise ops in
    HF's module): the same math, float32 statistics and the weight applied after the cast
    back, as HF does it for half-precision inputs."""
    w = norm.weight
    if fused_cpu.usable(x, w):
        return fused_cpu.rms_norm(x, w, norm.variance_epsilon)
    if x.dtype == w.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, norm.variance_epsilon)
    return w * F.rms_norm(x.float(), w.shape, eps=norm.variance_epsilon).to(x.dtype)


def _concat(buf, parts):
    """torch.cat(parts) into buf, reused when it still fits (a captured graph reads it)."""
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    if buf is None or buf.shape != shape or buf.dtype != parts[0].dtype \
            or buf.device != parts[0].device:
        buf = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device)
    return torch.cat([p.detach() for p in parts], out=buf)


class FusedProjections:
    """One decoder layer's q / k / v projections as one GEMM and gate / up as another (5 HF
    modules, 5 GEMMs, become 2: a decode step of a small model is bound by per-op cost).
    The concatenated weights are copies: refresh() rebuilds them in place (same storage, so a
    captured CUDA graph stays valid) when a source parameter changed since, i.e. its version
    counter moved (an optimizer step, load_state_dict, any in-place write) or it was
    replaced."""

    def __init__(self, layer):
        a, mlp = layer.self_attn, layer.mlp
        self._qkv = [a.q_proj, a.k_proj, a.v_proj]
        self._gate_up = [mlp.gate_proj, mlp.up_proj]
        self.w_qkv = self.b_qkv = self.w_gate_up = self.b_gate_up = None
        self._seen = None
        self.refresh()

    def refresh(self) -> None:
        mods = self._qkv + self._gate_up
        seen = [(t.data_ptr(), t._version) for m in mods for t in (m.weight, m.bias)
                if t is not None]
        if seen == self._seen:
            return
        # ordinary tensors even when called under inference_mode: refreshed in place later
        with torch.inference_mode(False), torch.no_grad():
            self.w_qkv = _concat(self.w_qkv, [m.weight for m in self._qkv])
            self.w_gate_up = _concat(self.w_gate_up, [m.weight for m in self._gate_up])
            if self._qkv[0].bias is not None:  # Qwen2, Llama with attention_bias
                self.b_qkv = _concat(self.b_qkv, [m.bias for m in self._qkv])
            if self._gate_up[0].bias is not None:  # Llama with mlp_bias
                self.b_gate_up = _concat(self.b_gate_up, [m.bias for m in self._gate_up])
        self._seen = seen

    def qkv(self, h):
        return F.linear(h, self.w_qkv, self.b_qkv)

    def gate_up(self, h):
        return F.linear(h, self.w_gate_up, self.b_gate_up)


class DecoderRunner:
    """Prefill + shared-prefix decode for a Qwen3/Qwen2/Llama HF model (weights shared, not
    copied)."""

    def __init__(self, model, cuda_graphs: bool = False):
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
        # replay each decode step from a CUDA graph (per state and row count); CUDA only
        self.cuda_graphs = cuda_graphs
        self.capture = True  # False after freeze(): steps without a graph run eagerly
        self.pool = None  # KVPool: reserve()
        self._fused = {}  # id(layer) -> FusedProjections
        self.graph_captures = 0  # CUDA graphs captured so far (a server's metric)
        self.eager_steps = 0  # CUDA decode steps that found no graph and could not capture one
        self._qkv_split = [self.num_heads * self.head_dim] + 2 * [self.num_kv_heads * self.head_dim]

    @property
    def device(self):
        return self.embed.weight.device

    def reserve(self, prompts: int, prompt_len: int, rows: int,
                suffix_capacity: int) -> KVPool:
        """Allocate the KVPool that every later prefill uses when its batch fits (see KVPool)."""
        self.pool = KVPool(self, prompts, prompt_len, rows, suffix_capacity)
        return self.pool

    def freeze(self) -> None:
        """Capture no more CUDA graphs (a server after warm-up): a decode step of a shape that
        has none runs eagerly and counts in eager_steps."""
        self.capture = False

    @contextlib.contextmanager
    def eager(self):
        """Within: no pool and no CUDA graphs (work of shapes a server does not plan for, such
        as reasoning mode's thinking, where rows leave one by one)."""
        saved = self.pool, self.cuda_graphs
        self.pool, self.cuda_graphs = None, False
        try:
            yield self
        finally:
            self.pool, self.cuda_graphs = saved

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def _rope(self, x, positions):
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0].to(x.dtype), sin[0].to(x.dtype)

    def _qkv(self, layer, proj, h, cos, sin):
        a = layer.self_attn
        t = h.shape[0]
        q, k, v = proj.qkv(h).split(self._qkv_split, -1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(a.q_norm, q), rms_norm(a.k_norm, k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _block(self, layer, x, cos, sin, attend):
        """One decoder layer; attend(q, k, v) -> attention output [T, Hq, D]."""
        proj = self.fused(layer)
        o = attend(*self._qkv(layer, proj, rms_norm(layer.input_layernorm, x), cos, sin))
        x = x + layer.self_attn.o_proj(o.reshape(x.shape[0], -1))
        gate, up = proj.gate_up(rms_norm(layer.post_attention_layernorm, x)).chunk(2, -1)
        return x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def fused(self, layer) -> "FusedProjections":
        """The layer's concatenated projections, refreshed where the weights changed."""
        f = self._fused.get(id(layer))
        if f is None:
            f = self._fused[id(layer)] = FusedProjections(layer)
        f.refresh()
        return f

    @torch.no_grad()
    def prefill(self, prompts, rows_per_prompt, suffix_capacity: int):
        """Run the prompts (token-id lists), store their KV once, and allocate suffix buffers
        for rows_per_prompt rows each (an int, or one count per prompt). Returns (hidden
        [B, H] at each prompt's last position after the final norm, KVState)."""
        with phase("gream.prefill"):
            return self._prefill(prompts, rows_per_prompt, suffix_capacity)

    def _prefill(self, prompts, rows_per_prompt, suffix_capacity: int):
        ids, positions, cu = pack_prompts(prompts, self.device)
        lens = (cu[1:] - cu[:-1]).long()
        max_len = int(lens.max())
        x = self.embed(ids)
        cos, sin = self._rope(x, positions)
        pk, pv = [], []
        for layer in self.layers:
            def attend(q, k, v):
                pk.append(k)
                pv.append(v)
                return varlen_causal_attention(q, k, v, cu, max_len, self.scale)
            x = self._block(layer, x, cos, sin, attend)
        last = rms_norm(self.norm, x[cu[1:].long() - 1])
        counts = torch.as_tensor(rows_per_prompt, device=self.device).long().expand(len(prompts))
        _, row_prompt = group_rows(counts)
        if self.pool is not None:
            if self.pool.fits(len(prompts), max_len, len(row_prompt), suffix_capacity):
                return last, self.pool.take(pk, pv, cu, lens, row_prompt)
            self.pool.misses += 1
        shape = (len(self.layers), len(row_prompt), suffix_capacity, self.num_kv_heads,
                 self.head_dim)
        # rope for every position a decode step can reach, looked up by position
        cos, sin = self._rope(last, torch.arange(max_len + suffix_capacity, device=self.device))
        state = KVState(pk, pv, cu, lens, row_prompt,
                        torch.zeros(shape, dtype=self.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.dtype, device=self.device), cos, sin)
        return last, state

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, state: KVState) -> torch.Tensor:
        """Feed one token per live row [rows]; returns the rows' hidden states [rows, H] (final
        norm)."""
        n = state.rows
        if state.steps >= state.suffix_k.shape[2]:
            raise InvalidInputError(f"decode: suffix capacity {state.suffix_k.shape[2]} is full")
        if tokens.shape != (n,):
            raise InvalidInputError(f"decode: expected one token per live row ({n}), got "
                                    f"shape {list(tokens.shape)}")
        state.tokens[:n].copy_(tokens)
        with phase("gream.decode"):
            if self.cuda_graphs and state.tokens.is_cuda:
                out = self._graph_step(state, n)
            else:
                out = self._step(state, n)
        state.steps += 1
        return out

    def _step(self, state: KVState, n: int) -> torch.Tensor:
        """One decode step of the first n rows, reading and advancing only state's buffers: the
        same shapes and launches for every call with n rows, no host sync (graph-capturable)."""
        lens = state.lens[:n]
        write = state.slot0[:n] + lens  # each row's next suffix entry, flat per layer
        positions = state.start_pos[:n] + lens
        cos, sin = state.rope_cos[positions], state.rope_sin[positions]
        lens.add_(1)  # the attention covers the entry written now
        x = self.embed(state.tokens[:n])
        hkv, d = self.num_kv_heads, self.head_dim
        # every row holds state.steps + 1 suffix entries now: the torch path reads no more (the
        # kernel stops at each row's length itself, over shapes a CUDA graph can keep)
        # (likewise the prompts' KV: the state's whole buffer on CUDA, the batch's tokens here)
        cuda = state.suffix_k.is_cuda
        s = state.suffix_k.shape[2] if cuda else state.steps + 1
        t = None if cuda else state.prefix_tokens
        plan = None if cuda else state.cpu_plan()
        for i, layer in enumerate(self.layers):
            def attend(q, k, v, i=i):
                state.suffix_k[i].view(-1, hkv, d).index_copy_(0, write, k)
                state.suffix_v[i].view(-1, hkv, d).index_copy_(0, write, v)
                return shared_prefix_attention(q, state.prefix_k[i][:t], state.prefix_v[i][:t],
                                               state.prefix_cu, state.row_cu,
                                               state.suffix_k[i, :n, :s], state.suffix_v[i, :n, :s],
                                               lens, self.scale, check=False, cpu_plan=plan)
            x = self._block(layer, x, cos, sin, attend)
        return rms_norm(self.norm, x)

    def _graph_step(self, state: KVState, n: int) -> torch.Tensor:
        """_step replayed from a CUDA graph captured the first time the state runs n rows (with
        a pool: only pooled states capture, and none after freeze()). That
        first step runs eagerly on a side stream (it compiles the Triton kernels and warms the
        allocator, which capture needs) and is the step's result; capture only records, so it
        leaves the state as the eager step left it."""
        if n not in state.graphs and (not self.capture or state.pool is not self.pool):
            # frozen, or a batch outside the pool (its graphs would die with it): eager
            self.eager_steps += 1
            return self._step(state, n)
        if n not in state.graphs:
            side = torch.cuda.Stream(device=state.tokens.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._step(state, n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._step(state, n)
            self.graph_captures += 1
            state.graphs[n] = (graph, static_out)
            return out
        graph, static_out = state.graphs[n]
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

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


def make_runner(model, cuda_graphs: bool = False):
    """DecoderRunner where it supports the architecture (decode steps replayed from CUDA graphs
    with cuda_graphs=True, on CUDA), HFRunner otherwise."""
    return DecoderRunner(model, cuda_graphs) if supports(model) else HFRunner(model)


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
