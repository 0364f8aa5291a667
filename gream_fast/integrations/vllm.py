"""vLLM adapter: generated SIDs constrained to real items, per request, inside vLLM's sampler.

A request opts in with SamplingParams(extra_args={"gream_mode": "direct" | "reasoning"}); a
request without the key is left alone. Direct mode: the SID starts at the first generated token.
Reasoning mode: free text until the answer marker ("<answer>") appears in the generated text
(found by a MarkerAutomaton, however BPE split it), then the SID. In the SID a row's logits are
masked to exactly the trie children of its node (-inf elsewhere); after a complete SID that is
the end token alone (the trie's own structure); after the end token the request is left alone.

    save_constraint(SIDConstraint(index, tokenizer), "sid.safetensors", tokenizer)
    llm = vllm.LLM(model_dir, logits_processors=[SIDTrieLogitsProcessor],
                   additional_config={"gream_constraint": "sid.safetensors"})
    llm.generate(prompts, SamplingParams(n=8, extra_args={"gream_mode": "direct"}))

The end token is the constraint's: build it with the tokenizer's EOS for direct mode, with the
first token of "</answer>" for reasoning mode (as generate.reasoning does). The workers load the
file named in additional_config["gream_constraint"] and need no tokenizer.

TrieMask is the library-free core (tensors in, tensors out; no vLLM). Two thin adapters map
vLLM's calls onto it, one per interface generation:
- SIDTrieLogitsProcessorV1: vllm.v1.sample.logits_processor (vLLM 0.10.1 to ~0.24, where a
  custom processor makes vLLM use its V1 model runner). Rows are persistent-batch indices.
- SIDTrieLogitsProcessorV2: vllm.v1.worker.gpu.sample.logits_processor (model runner V2, the
  only runner from ~0.34). Rows are reordered every step; state is keyed by request slot.
SIDTrieLogitsProcessor is the one the installed vLLM runs (V2 when vLLM has no V1 model
runner). The classes are built on first access, so importing this module never imports vLLM.
"""
import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import torch

from gream_fast.errors import FormatError, InvalidInputError
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.generate.marker import MarkerAutomaton
from gream_fast.index.tokens import sid_token_table
from gream_fast.model.index_record import check_pairing

MODE_KEY = "gream_mode"  # SamplingParams.extra_args key: the request's mode
CONFIG_KEY = "gream_constraint"  # vllm_config.additional_config key: the constraint file
ALLOW_KEY = "gream_allow_index_mismatch"  # additional_config key: run with another index
OFF, DIRECT, REASONING = 0, 1, 2  # a slot's mode
WAIT, SID, DONE = 0, 1, 2  # a slot's phase: before the marker, in the SID, past the end token
_CODES = {None: OFF, "direct": DIRECT, "reasoning": REASONING}
_MARKER_ARRAY, _MARKER_META = "answer_marker_table", "answer_marker"


def request_mode(params) -> str | None:
    """The mode a request asked for in SamplingParams.extra_args["gream_mode"]: "direct",
    "reasoning", or None (no key: leave the request alone). Raises InvalidInputError (a
    ValueError, which vLLM reports as a bad request) for anything else."""
    extra = getattr(params, "extra_args", None) or {}
    mode = extra.get(MODE_KEY) if isinstance(extra, dict) else None
    if mode is None or (isinstance(mode, str) and mode in _CODES):
        return mode
    raise InvalidInputError(f'SamplingParams.extra_args["{MODE_KEY}"]: expected "direct" or '
                            f'"reasoning" (or no key: unconstrained), got {mode!r}')


def save_constraint(constraint: SIDConstraint, path, tokenizer=None,
                    answer: str = "<answer>") -> None:
    """Write `constraint` to `path` (one safetensors file) for the vLLM processors. With a
    tokenizer (which must map the SID strings to the constraint's ids), the file also holds
    the token automaton of the `answer` marker, which reasoning mode needs."""
    arrays, meta = {}, {}
    if tokenizer is not None:
        table = sid_token_table(tokenizer, constraint.index)
        if not np.array_equal(table, constraint.token_table):
            raise InvalidInputError("save_constraint: the tokenizer's SID token ids differ from "
                                    "the constraint's (build the SIDConstraint from it)")
        auto = MarkerAutomaton.from_tokenizer(tokenizer, answer)
        arrays, meta = {_MARKER_ARRAY: auto.table.cpu().numpy()}, {_MARKER_META: answer}
    constraint.save(path, arrays=arrays, **meta)


def load_constraint(path, device="cpu") -> tuple[SIDConstraint, MarkerAutomaton | None]:
    """(constraint, the marker automaton or None) from a file written by save_constraint."""
    constraint, arrays, meta = SIDConstraint.load(path, device, extra=True)
    if _MARKER_ARRAY not in arrays:
        return constraint, None
    try:
        table = torch.from_numpy(np.ascontiguousarray(arrays[_MARKER_ARRAY]))
        return constraint, MarkerAutomaton(meta[_MARKER_META], table).to(device)
    except (KeyError, InvalidInputError) as e:
        raise FormatError(f"{path}: not a valid answer-marker table ({e})") from None


class TrieMask:
    """Per-slot constraint state of a batch engine, on one device.

    A slot holds one request: its mode (OFF, DIRECT, REASONING), phase (WAIT for the marker,
    in the SID, DONE), marker-automaton state, trie node and the number of tokens fed. Each is
    an int32 tensor [num_slots + 1]; the extra slot is a sink for rows of no request (slot -1),
    always OFF. A step is tensor work: no Python loop over rows, no host sync. The trie's edges
    are one sorted int64 key each ((parent << 32) | token), so walking a node along a token is a
    searchsorted; masking a row to its node's children is a gather and a scatter over the CSR
    arrays (kernels/trie_logits.py fuses masking with top-k, which a sampler does not want)."""

    def __init__(self, constraint: SIDConstraint, num_slots: int,
                 automaton: MarkerAutomaton | None = None, device=None):
        self.device = torch.device(device if device is not None else constraint.device)
        self.num_slots = int(num_slots)
        self.constraint = constraint
        self.automaton = automaton.to(self.device) if automaton is not None else None
        a = {k: v.astype(np.int64) for k, v in constraint.trie.to_arrays().items()}
        self.indptr, self.tokens, self.keys = (torch.from_numpy(x).to(self.device) for x in (
            a["indptr"], a["tokens"], (a["parent"][1:] << 32) | a["tokens"]))
        self.fanout = self.indptr[1:] - self.indptr[:-1]
        self.width = int(a["tokens"].max()) + 1  # logits need a column for every trie token
        self._offsets = torch.arange(constraint.max_children, device=self.device)
        self._all = torch.arange(self.num_slots, device=self.device)
        n = self.num_slots + 1
        self.mode, self.phase, self.marker, self.node, self.count = (
            torch.zeros(n, dtype=torch.int32, device=self.device) for _ in range(5))

    # -- slots ----------------------------------------------------------------------------------
    def _slots(self, slots) -> torch.Tensor:
        """Slot ids as a long tensor on the device, -1 mapped to the sink."""
        s = torch.as_tensor(slots, device=self.device).long().reshape(-1)
        return torch.where(s >= 0, s, self.num_slots)

    def reset(self, slots, modes) -> None:
        """Start the requests now in `slots` (a host sequence of slot ids) afresh. `modes`: one
        mode for all, or one per slot: "direct", "reasoning" or None (OFF: left alone)."""
        slots = [int(s) for s in slots]
        if isinstance(modes, str) or modes is None:
            modes = [modes] * len(slots)
        if len(modes) != len(slots) or any(not 0 <= s < self.num_slots for s in slots):
            raise InvalidInputError(f"reset: expected one mode per slot and slots in 0.."
                                    f"{self.num_slots - 1}, got slots {slots} and modes {modes}")
        if len(set(slots)) != len(slots):
            raise InvalidInputError(f"reset: slots must be distinct, got {slots}")
        for m in modes:
            if m not in _CODES:
                raise InvalidInputError(f'mode: expected "direct", "reasoning" or None, got {m!r}')
        if "reasoning" in modes and self.automaton is None:
            raise InvalidInputError(
                "reasoning mode needs the answer marker's automaton: save the constraint with "
                "save_constraint(constraint, path, tokenizer) (or pass a MarkerAutomaton)")
        if not slots:
            return
        idx = torch.tensor(slots, device=self.device)
        code = torch.tensor([_CODES[m] for m in modes], dtype=torch.int32, device=self.device)
        self.mode[idx] = code
        self.phase[idx] = torch.where(code == DIRECT, SID, torch.where(code == OFF, DONE, WAIT)
                                      ).int()
        for t in (self.marker, self.node, self.count):
            t[idx] = 0

    def move(self, src) -> None:
        """Slot i takes the state slot src[i] had (-1: OFF), for i < len(src): one gather, for
        engines that move requests between batch rows."""
        src = self._slots(src)
        k = len(src)
        if k > self.num_slots:
            raise InvalidInputError(f"move: expected at most {self.num_slots} sources, got {k}")
        for t in (self.mode, self.phase, self.marker, self.node, self.count):
            t[:k] = t[src]

    # -- steps ----------------------------------------------------------------------------------
    def state(self, slots) -> tuple:
        """(mode, phase, marker, node) of each slot: a row state for step() and apply()."""
        s = self._slots(slots)
        return self.mode[s], self.phase[s], self.marker[s], self.node[s]

    def step(self, state: tuple, tokens: torch.Tensor) -> tuple:
        """Row states after one token each (-1: no token; the state is kept)."""
        mode, phase, marker, node = state
        tok = torch.as_tensor(tokens, device=self.device).long()
        live = (tok >= 0) & (mode != OFF)
        start = torch.zeros_like(live)
        if self.automaton is not None:
            waiting = live & (phase == WAIT)
            marker = self.automaton.step(marker, torch.where(waiting, tok, -1))
            start = waiting & self.automaton.accepted(marker)  # the SID starts after this token
        in_sid = live & (phase == SID)
        key = (node.long() << 32) | tok.clamp(min=0)
        edge = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        hit = self.keys[edge] == key
        child = edge + 1
        # the end token leads to a leaf; a token off the trie (another stage forced it) ends too
        done = in_sid & (~hit | (self.fanout[child] == 0))
        node = torch.where(in_sid & hit, child, node).int()
        node = torch.where(start, 0, node).int()
        phase = torch.where(done, DONE, torch.where(start, SID, phase)).int()
        return mode, phase, marker, node

    def advance(self, slots, tokens) -> None:
        """Feed each slot its newly generated tokens. slots [R] distinct (-1: none); tokens [R]
        or [R, W] with -1 padding at the end of a row."""
        idx = self._slots(slots)
        tok = torch.as_tensor(tokens, device=self.device)
        tok = tok[:, None] if tok.dim() == 1 else tok
        if tok.dim() != 2 or tok.shape[0] != len(idx):
            raise InvalidInputError(f"tokens: expected [{len(idx)}] or [{len(idx)}, W], got "
                                    f"shape {list(tok.shape)}")
        state = self.state(idx)
        for j in range(tok.shape[1]):
            state = self.step(state, tok[:, j])
        _, self.phase[idx], self.marker[idx], self.node[idx] = state
        self.count[idx] += (tok >= 0).sum(1).int()

    def apply(self, logits: torch.Tensor, slots=None, state: tuple | None = None) -> torch.Tensor:
        """Mask `logits` [R, V] in place: rows in their SID to exactly their node's trie children
        (-inf elsewhere); every other row keeps its values bit for bit. Row r is slot slots[r]
        (default: slot r), or has the row state state[.][r] (see state() and step())."""
        if logits.dim() != 2 or logits.shape[1] < self.width:
            raise InvalidInputError(f"logits: expected [rows, V] with V >= {self.width} (a column "
                                    f"for every SID and end token), got {list(logits.shape)}")
        if state is None:
            state = self.state(self._all[:logits.shape[0]] if slots is None else slots)
        mode, phase, _, node = state
        if len(node) != logits.shape[0]:
            raise InvalidInputError(f"logits: {logits.shape[0]} rows but {len(node)} slots")
        masked = (mode != OFF) & (phase == SID)
        start = self.indptr[node.long()]
        fan = self.indptr[node.long() + 1] - start
        off = torch.where(self._offsets < fan[:, None], self._offsets, 0)  # pads repeat child 0
        col = self.tokens[(start[:, None] + off).clamp(max=len(self.tokens) - 1)]
        kept = logits.gather(1, col)
        logits.masked_fill_(masked[:, None], float("-inf"))
        return logits.scatter_(1, col, kept)  # unmasked rows get their own values back


def _mask_from_config(vllm_config, num_slots: int, device) -> TrieMask:
    extra = getattr(vllm_config, "additional_config", None) or {}
    path = extra.get(CONFIG_KEY) if isinstance(extra, dict) else getattr(extra, CONFIG_KEY, None)
    if not path:
        raise InvalidInputError(
            f'additional_config["{CONFIG_KEY}"]: expected the path of a file written by '
            f"gream_fast.integrations.vllm.save_constraint, got {path!r} (pass "
            f'additional_config={{"{CONFIG_KEY}": path}} to vllm.LLM)')
    constraint, automaton = load_constraint(path)  # host copy: TrieMask keeps its own arrays
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    if hf_config is not None:  # the model's own record of its index (model.index_record)
        allow = bool((extra.get(ALLOW_KEY) if isinstance(extra, dict)
                      else getattr(extra, ALLOW_KEY, None)))
        check_pairing(SimpleNamespace(config=hf_config), constraint.index,
                      index_name=f'additional_config["{CONFIG_KEY}"] {path}',
                      allow_mismatch=allow, flag=f'additional_config["{ALLOW_KEY}"]=True')
    return TrieMask(constraint, num_slots, automaton, device)


def _pad(rows: list, fill: int = -1) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# -- vLLM V1 interface --------------------------------------------------------------------------
def _build_v1():
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    class SIDTrieLogitsProcessorV1(LogitsProcessor):
        """TrieMask behind vLLM's V1 logits-processor interface. A slot is a persistent-batch
        index: logits row i belongs to the request at index i. The host keeps, per index of an
        opted-in request, [mode, a live reference to its output token list, tokens fed so
        far] (None for no request or an unconstrained one); the device side is the TrieMask."""

        def __init__(self, vllm_config, device, is_pin_memory: bool):
            n = vllm_config.scheduler_config.max_num_seqs
            self.mask = _mask_from_config(vllm_config, n, device)
            self.reqs: list = [None] * n
            self.pin = bool(is_pin_memory)

        @classmethod
        def validate_params(cls, sampling_params):
            """Frontend check of extra_args["gream_mode"]: a bad value fails the request."""
            request_mode(sampling_params)

        def is_argmax_invariant(self) -> bool:
            return False  # masking changes greedy picks

        def update_state(self, batch_update) -> None:
            """Batch changes, in vLLM's order: a removed index turns OFF; an added request
            (index, params, prompt ids, output ids) starts afresh at its index; moves carry
            state between indices (SWAP exchanges, UNIDIRECTIONAL a -> b leaves a empty).
            None: no change (new tokens are read in apply, once vLLM has filled the async
            placeholders)."""
            if not batch_update:
                return
            resets = {}
            for i in batch_update.removed:
                resets[i], self.reqs[i] = None, None
            for added in batch_update.added:
                i, mode, out = added[0], request_mode(added[1]), added[-1]
                resets[i], self.reqs[i] = mode, (None if mode is None else [mode, out, 0])
            self.mask.reset(list(resets), list(resets.values()))
            if batch_update.moved:
                src, reqs = list(range(len(self.reqs))), self.reqs
                for a, b, kind in batch_update.moved:
                    if kind == MoveDirectionality.SWAP:
                        src[a], src[b], reqs[a], reqs[b] = src[b], src[a], reqs[b], reqs[a]
                    else:
                        src[a], src[b], reqs[a], reqs[b] = -1, src[a], None, reqs[a]
                self.mask.move(src)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            """Feed each opted-in request the output tokens it gained since the last call (all
            of them after a resume; all again if vLLM dropped some), then mask the batch."""
            rows, active = [], False  # [slot, new tokens...] per request that has some
            for i, req in enumerate(self.reqs[:logits.shape[0]]):
                if req is None:
                    continue
                active, (mode, out, fed) = True, req
                if len(out) < fed:  # tokens were discarded (KV-load failure): feed anew
                    self.mask.reset([i], mode)
                    fed = 0
                new = list(out[fed:])
                if -1 in new:  # an async placeholder not yet filled: wait for it
                    new = new[:new.index(-1)]
                req[2] = fed + len(new)
                if new:
                    rows.append([i] + new)
            if not active:
                return logits
            if rows:  # one copy, pinned and asynchronous as vLLM's own processors do it
                rows = torch.from_numpy(_pad(rows))
                rows = (rows.pin_memory() if self.pin else rows).to(self.mask.device,
                                                                     non_blocking=True)
                self.mask.advance(rows[:, 0], rows[:, 1:])
            return self.mask.apply(logits)

    SIDTrieLogitsProcessorV1.__qualname__ = "SIDTrieLogitsProcessorV1"  # picklable by name
    return SIDTrieLogitsProcessorV1


# -- vLLM V2 interface (model runner V2) --------------------------------------------------------
def _build_v2():
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    class SIDTrieLogitsProcessorV2(LogitsProcessor):
        """TrieMask behind model runner V2's logits-processor interface. A slot is vLLM's
        request slot (recycled through a free list). Committed tokens are read on the device
        from req_states (all_token_ids up to total_len, outputs from prompt_len on); under
        speculative decoding a request's later rows also see this step's draft tokens
        (ctx.input_ids), fed to a per-row copy of its state."""

        def __init__(self, vllm_config, req_states):
            n = req_states.max_num_reqs
            self.req_states = req_states
            self.mask = _mask_from_config(vllm_config, n, req_states.device)
            spec = getattr(vllm_config, "speculative_config", None)
            self.drafts = int(getattr(spec, "num_speculative_tokens", None) or 0)
            self.opted = np.zeros(n, dtype=bool)  # host: the slot's request is constrained
            self.backlog = np.zeros(n, dtype=np.int64)  # host: outputs it came in with
            self.first = torch.zeros(n, dtype=torch.int64, device=self.mask.device)  # prompt_len
            self.staged: dict = {}  # slot -> (mode, prompt_len), flushed by apply_staged_writes

        @classmethod
        def validate_params(cls, sampling_params):
            """Admission check of extra_args["gream_mode"]: a bad value fails the request."""
            request_mode(sampling_params)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            """A request enters slot req_idx (maybe resumed with outputs): stage its reset."""
            mode = request_mode(sampling_params)
            prompt = int(self.req_states.prompt_len.np[req_idx])
            self.staged[req_idx] = (mode, prompt)
            self.opted[req_idx] = mode is not None
            self.backlog[req_idx] = int(self.req_states.prefill_len.np[req_idx]) - prompt
            return mode is not None

        def apply_staged_writes(self) -> None:
            """Reset the slots of the requests added since the last step, on the device."""
            if not self.staged:
                return
            slots = list(self.staged)
            self.mask.reset(slots, [m for m, _ in self.staged.values()])
            self.first[slots] = torch.tensor([p for _, p in self.staged.values()],
                                             device=self.mask.device)
            self.staged.clear()

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            """Feed every scheduled request its newly committed tokens (at most 1 + drafts per
            step, or the backlog a request came in with), then mask each row by its request's
            state plus the draft tokens before the row."""
            reqs = ctx.idx_mapping_np[ctx.idx_mapping_np >= 0]
            if not self.opted[reqs].any():
                return logits
            width = max(1 + self.drafts, int(self.backlog[reqs].max()))
            self.backlog[reqs] = 0
            slots = ctx.idx_mapping.long()
            s = slots.clamp(min=0)
            ids = self.req_states.all_token_ids.gpu
            pos = (self.first[s] + self.mask.count[s].long())[:, None] + torch.arange(
                width, device=s.device)
            tok = ids[s[:, None], pos.clamp(max=ids.shape[1] - 1)].long()
            total = self.req_states.total_len.gpu[s].long()
            self.mask.advance(slots, torch.where(pos < total[:, None], tok, -1))
            state = self.mask.state(ctx.expanded_idx_mapping)
            if self.drafts:
                local = ctx.expanded_local_pos.long()
                first = torch.arange(len(local), device=local.device) - local
                for j in range(1, self.drafts + 1):
                    t = ctx.input_ids[(first + j).clamp(max=len(local) - 1)].long()
                    state = self.mask.step(state, torch.where(local >= j, t, -1))
            return self.mask.apply(logits, state=state)

    SIDTrieLogitsProcessorV2.__qualname__ = "SIDTrieLogitsProcessorV2"
    return SIDTrieLogitsProcessorV2


_BUILDERS = {"SIDTrieLogitsProcessorV1": (_build_v1, "vllm.v1.sample.logits_processor"),
             "SIDTrieLogitsProcessorV2": (_build_v2,
                                          "vllm.v1.worker.gpu.sample.logits_processor")}


def _default_name() -> str:
    try:  # vLLM runs custom processors on its V1 runner while it has one
        v1_runner = importlib.util.find_spec("vllm.v1.worker.gpu_model_runner") is not None
    except ImportError as e:
        raise ImportError(f"gream_fast.integrations.vllm.SIDTrieLogitsProcessor needs vLLM ({e})"
                          ) from None
    return "SIDTrieLogitsProcessorV1" if v1_runner else "SIDTrieLogitsProcessorV2"


def __getattr__(name: str):
    """Build the adapter classes on first access (vLLM is imported only then)."""
    if name == "SIDTrieLogitsProcessor":
        cls = getattr(sys.modules[__name__], _default_name())  # built once, then a global
    elif name in _BUILDERS:
        build, module = _BUILDERS[name]
        try:
            cls = build()
        except ImportError as e:
            raise ImportError(f"gream_fast.integrations.vllm.{name} needs vLLM's {module} "
                              f"(install a vLLM that has it): {e}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls
