"""Drive the vLLM adapters through vLLM's REAL logits-processor interfaces the way its engine
does, checking every row's mask against the trie at every step:

    PYTHONPATH=<unpacked vLLM>:<repo>:<tests> python tests/vllm_driver.py v1|v2 <folder>

<folder> holds constraint.safetensors (save_constraint, with the answer marker) and
tokenizer.json. v1: vLLM 0.24's persistent batch (BatchUpdateBuilder adds, removals, condense
moves, swaps, async placeholders, preempted requests resumed with their outputs). v2: model
runner V2 (recycled slots, rows reordered every step, speculative draft rows, chunked prefill,
resumed requests). Prints one "ok" line; any mismatch raises.

Imported without vLLM by tests/test_integration_vllm.py for expected_allowed(), the oracle."""
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

MARKER = "<answer>"
MODES = ("direct", "reasoning", None)


def expected_allowed(trie, decode, mode, tokens, marker=MARKER):
    """The tokens a row may emit next, from its generated tokens alone, or None (the row must be
    untouched). Direct: the SID is all of them; reasoning: what follows the shortest prefix
    whose text contains the marker (no marker yet: None). None too after the end token or off
    the trie (trie.allowed is empty there)."""
    if mode is None:
        return None
    sid = list(tokens)
    if mode == "reasoning":
        k = next((k for k in range(1, len(sid) + 1) if marker in decode(sid[:k])), None)
        if k is None:
            return None
        sid = sid[k:]
    allowed = trie.allowed(np.asarray(sid, dtype=np.int64))
    return set(allowed.tolist()) if len(allowed) else None


def check_rows(before, after, wants, label=""):
    """Masked rows: finite exactly on the allowed tokens, with their own values; other rows:
    bit-identical."""
    for r, want in enumerate(wants):
        if want is None:
            assert torch.equal(after[r].view(torch.int32), before[r].view(torch.int32)), \
                f"{label} row {r}: should be untouched"
        else:
            finite = set(torch.nonzero(torch.isfinite(after[r])).flatten().tolist())
            shown = sorted(finite) if len(finite) < 30 else f"{len(finite)} tokens"
            assert finite == want, f"{label} row {r}: allowed {shown}, want {sorted(want)}"
            idx = sorted(want)
            assert torch.equal(after[r, idx], before[r, idx]), f"{label} row {r}: values changed"


class World:
    """The constraint, the tokenizer's decode and the random choices of a simulated model."""

    def __init__(self, folder, seed):
        from tokenizers import Tokenizer

        from gream_fast.integrations.vllm import load_constraint

        self.path = str(Path(folder) / "constraint.safetensors")
        self.tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        constraint = load_constraint(self.path)[0]
        self.trie, self.end = constraint.trie, constraint.eos_token_id
        self.vocab = self.tok.get_vocab_size()
        self.width = self.vocab + 13  # a padded LM head, as vLLM's is
        spellings = [[" <answer>"], ["x<answer>"], ["<answer>"], ["\n<answer>"],
                     ["answer><answer>"], ["<ans", "wer>"], ["<", "answer", ">"]]
        self.spellings = [sum((self.tok.encode(t, add_special_tokens=False).ids for t in parts),
                              []) for parts in spellings]
        assert any(len(sp) > 1 for sp in self.spellings)  # the marker is split somewhere
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.completed = {"direct": 0, "reasoning": 0}
        self.made = 0  # requests created so far

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def want(self, req, extra=()):
        return expected_allowed(self.trie, self.decode, req.mode, list(req.out) + list(extra))

    def pick(self, req, want, prefer=None):
        """A token for a row of `req`: one of `want` (masked rows; `prefer` half the time when
        allowed), else free text, often a spelling of the marker in pieces."""
        if want is not None:
            if prefer is not None and prefer in want and self.rng.random() < 0.5:
                return prefer
            return self.rng.choice(sorted(want))
        if not req.queue and self.rng.random() < 0.3:
            req.queue = list(self.rng.choice(self.spellings))
        return req.queue.pop(0) if req.queue else self.rng.randrange(self.vocab)

    def logits(self, rows):
        return torch.randn(rows, self.width, generator=self.gen)

    def request(self, n):
        from vllm import SamplingParams

        mode = MODES[n % 3]
        params = SamplingParams(max_tokens=24, extra_args=None if mode is None else
                                {"gream_mode": mode})
        prompt = [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(2, 6))]
        return SimpleNamespace(n=n, mode=mode, params=params, prompt=prompt, out=[],
                               pending=None, queue=[], fresh=True)

    def admit(self, waiting, closing):
        """The next request to add: a preempted one back (70% of the time when any waits),
        else a new one; None when closing and no preempted one was taken."""
        req = waiting.pop(0) if waiting and self.rng.random() < 0.7 else None
        if req is None and not closing:
            req, self.made = self.request(self.made), self.made + 1
        return req

    def finished(self, req):
        """The request stops once past its end token (plus a few free tokens) or at 24."""
        if len(req.out) >= 24:
            return True
        if req.mode is None or self.end not in req.out:
            return False
        return len(req.out) - req.out.index(self.end) > 2

    def tally(self, req):
        """Count a request whose SID (after its marker in reasoning mode) reached the end."""
        if req.mode is None:
            return
        start = 0
        if req.mode == "reasoning":
            start = next((k for k in range(1, len(req.out) + 1)
                          if MARKER in self.decode(req.out[:k])), len(req.out))
        self.completed[req.mode] += self.end in req.out[start:]


def check_class(cls, load_by_name):
    """The class vLLM would load: the default for this vLLM, by name as the engine's loader
    does it, picklable by reference (vLLM ships it to its engine process); and its
    validate_params."""
    import pickle

    from vllm import SamplingParams

    from gream_fast.integrations.vllm import SIDTrieLogitsProcessor

    assert SIDTrieLogitsProcessor is cls, (SIDTrieLogitsProcessor, cls)
    assert load_by_name(["gream_fast.integrations.vllm:SIDTrieLogitsProcessor"]) == [cls]
    assert pickle.loads(pickle.dumps(cls)) is cls

    cls.validate_params(SamplingParams(extra_args={"gream_mode": "direct"}))
    cls.validate_params(SamplingParams())
    try:
        cls.validate_params(SamplingParams(extra_args={"gream_mode": "beam"}))
    except ValueError as e:
        assert "gream_mode" in str(e) and "reasoning" in str(e), e
    else:
        raise AssertionError("validate_params accepted gream_mode='beam'")


# -- V1: vLLM 0.24's persistent batch -----------------------------------------------------------
def run_v1(folder, steps=60, slots=6, seed=0):
    from vllm.v1.sample.logits_processor import (BatchUpdateBuilder, LogitsProcessor,
                                                 MoveDirectionality, _load_logitsprocs_by_fqcns)

    from gream_fast.integrations.vllm import CONFIG_KEY, SIDTrieLogitsProcessorV1 as Proc

    assert issubclass(Proc, LogitsProcessor)
    check_class(Proc, _load_logitsprocs_by_fqcns)
    w = World(folder, seed)
    # vllm_config: a stand-in with the fields the processor reads (a real VllmConfig needs
    # vLLM's full dependency set, which the unpacked folder lacks)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=slots),
                          additional_config={CONFIG_KEY: w.path})
    proc = Proc(cfg, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    builder, batch, waiting = BatchUpdateBuilder(), [], []
    checked = resumed = dropped = 0
    for step in range(steps):
        # finished and preempted requests leave (gpu_input_batch.remove_request)
        for i, req in enumerate(batch):
            if req is None:
                continue
            preempt = w.rng.random() < 0.06
            if w.finished(req) or preempt:
                if req.pending is not None:
                    req.out.append(req.pending)
                    req.pending = None
                builder.removed_append(i)
                batch[i] = None
                (waiting.append(req) if preempt and not w.finished(req) else w.tally(req))
        # new and resumed requests fill removed indices first, then append (add_request)
        num_reqs = sum(r is not None for r in batch)
        while num_reqs < slots and (step < steps - 12 or waiting):
            req = w.admit(waiting, closing=step >= steps - 12)
            if req is None:
                break
            resumed += bool(req.out)
            i = builder.pop_removed()
            i = num_reqs if i is None else i
            if i == len(batch):
                batch.append(None)
            batch[i] = req
            builder.added.append((i, req.params, req.prompt, req.out))
            num_reqs += 1
        # condense: the last requests slide down into the holes (gpu_input_batch.condense)
        if builder.removed:
            if num_reqs == 0:
                batch.clear()
            else:
                last = num_reqs + len(builder.removed) - 1
                while builder.removed:
                    while last in builder.removed:
                        last -= 1
                    empty = builder.peek_removed()
                    if empty >= last:
                        break
                    builder.pop_removed()
                    batch[empty], batch[last] = batch[last], None
                    builder.moved.append((last, empty, MoveDirectionality.UNIDIRECTIONAL))
                    last -= 1
                del batch[num_reqs:]
        if num_reqs >= 2 and w.rng.random() < 0.4:  # reorder_batch swaps
            a, b = w.rng.sample(range(num_reqs), 2)
            batch[a], batch[b] = batch[b], batch[a]
            builder.moved.append((a, b, MoveDirectionality.SWAP))
        # async scheduling: last step's token is a -1 placeholder until just before sampling;
        # now and then a KV-load failure discards a request's last token instead
        for req in batch:
            if req.pending is not None and w.rng.random() < 0.03:
                req.pending, dropped = None, dropped + 1
                del req.out[-1:]
            if req.pending is not None:
                req.out.append(-1)
        proc.update_state(builder.get_and_reset(num_reqs))
        for req in batch:
            if req.pending is not None:
                req.out[-1], req.pending = req.pending, None
        if not batch:
            continue
        logits = w.logits(len(batch))
        before = logits.clone()
        after = proc.apply(logits)
        wants = [w.want(req) for req in batch]
        check_rows(before, after, wants, f"v1 step {step}")
        checked += len(batch)
        for req, want in zip(batch, wants):
            req.pending = w.pick(req, want)
    print(f"ok v1: {steps} steps, {w.made} requests ({resumed} resumed, {dropped} lost a token), "
          f"{checked} rows checked, complete SIDs {w.completed}")
    assert w.completed["direct"] > 0 and w.completed["reasoning"] > 0, w.completed
    assert resumed and dropped


# -- V2: model runner V2 (vLLM 0.34) ------------------------------------------------------------
class Buffer:
    """Stand-in for vLLM's UvaBackedTensor / StagedWriteTensor: those pin host memory and write
    through a Triton kernel, which a machine without an accelerator cannot do. Exposes the same
    fields the processors read: .gpu (the device tensor) and .np (the host array)."""

    def __init__(self, shape):
        self.gpu = torch.zeros(shape, dtype=torch.int32)
        self.np = self.gpu.numpy()  # shares memory on CPU, as a UVA view does


def run_v2(folder, steps=60, slots=6, drafts=2, seed=0):
    from vllm.v1.worker.gpu.sample.logits_processor import (LogitsContext, LogitsProcessor,
                                                            LogitsProcRequestState)
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from gream_fast.integrations.vllm import CONFIG_KEY, SIDTrieLogitsProcessorV2 as Proc

    assert issubclass(Proc, LogitsProcessor)
    check_class(Proc, _load_v2_logitsprocs_by_fqcns)
    w = World(folder, seed)
    max_len = 64
    states = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=w.width,
        all_token_ids=Buffer((slots, max_len)), prompt_len=Buffer(slots),
        prefill_len=Buffer(slots), total_len=Buffer(slots))
    cfg = SimpleNamespace(additional_config={CONFIG_KEY: w.path},
                          speculative_config=SimpleNamespace(num_speculative_tokens=drafts))
    proc = Proc(cfg, states)
    free, live, waiting = list(range(slots)), {}, []
    checked = draft_rows = resumed = 0
    for step in range(steps):
        for slot, req in list(live.items()):  # finished and preempted requests free their slot
            preempt = w.rng.random() < 0.06
            if w.finished(req) or preempt:
                del live[slot]
                free.append(slot)
                (waiting.append(req) if preempt and not w.finished(req) else w.tally(req))
        added = False
        while free and (step < steps - 12 or waiting):
            req = w.admit(waiting, closing=step >= steps - 12)
            if req is None:
                break
            resumed += bool(req.out)
            slot = free.pop()  # RequestState.add_request: slots come off a free list
            tokens = req.prompt + req.out  # a resumed request is prefilled with its outputs
            states.all_token_ids.gpu[slot, :len(tokens)] = torch.tensor(tokens)
            states.prompt_len.np[slot], states.prefill_len.np[slot] = len(req.prompt), len(tokens)
            states.total_len.gpu[slot] = len(tokens)
            assert proc.add_request(slot, req.params) == (req.mode is not None)
            live[slot], req.fresh, added = req, True, True
        if added:
            proc.apply_staged_writes()
        if not live:
            continue
        order = w.rng.sample(list(live), len(live))  # rows are reordered every step
        rows, local, inputs, positions, row_drafts = [], [], [], [], []
        for slot in order:
            req, total = live[slot], int(states.total_len.gpu[slot])
            d = w.rng.randint(0, drafts)
            guess = []
            for _ in range(d):  # a drafter's guesses: often allowed tokens, sometimes not
                guess.append(w.pick(req, w.want(req, guess)) if w.rng.random() < 0.8
                             else w.rng.randrange(w.vocab))
            row_drafts.append(guess)
            last = int(states.all_token_ids.gpu[slot, total - 1])
            for j in range(d + 1):
                rows.append(slot)
                local.append(j)
                inputs.append(last if j == 0 else guess[j - 1])
                positions.append(total - 1 + j)
        draft_rows += len(rows) - len(order)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(rows, dtype=torch.int32),
            idx_mapping=torch.tensor(order, dtype=torch.int32),
            idx_mapping_np=np.array(order, dtype=np.int32),
            expanded_local_pos=torch.tensor(local, dtype=torch.int32),
            input_ids=torch.tensor(inputs, dtype=torch.int32),
            pos=torch.tensor(positions, dtype=torch.int64),
            seq_lens_upper_bound_np=np.array([p + 1 for p in positions], dtype=np.int32))
        logits = w.logits(len(rows))
        before = logits.clone()
        after = proc.apply(logits, ctx)
        wants, r = [], 0
        for slot, guess in zip(order, row_drafts):
            wants += [w.want(live[slot], guess[:j]) for j in range(len(guess) + 1)]
        check_rows(before, after, wants, f"v2 step {step}")
        checked += len(rows)
        # verification: drafts are kept while the sample at their row equals them, then one
        # more sample; a request still in chunked prefill commits nothing
        for slot, guess in zip(order, row_drafts):
            req = live[slot]
            n_rows = len(guess) + 1
            samples = [w.pick(req, wants[r + j], guess[j] if j < len(guess) else None)
                       for j in range(n_rows)]
            r += n_rows
            if req.fresh and w.rng.random() < 0.25:
                continue
            req.fresh = False
            keep = 0
            while keep < len(guess) and samples[keep] == guess[keep]:
                keep += 1
            new = samples[:keep + 1]
            total = int(states.total_len.gpu[slot])
            states.all_token_ids.gpu[slot, total:total + len(new)] = torch.tensor(new)
            states.total_len.gpu[slot] = total + len(new)
            req.out += new
    print(f"ok v2: {steps} steps, {w.made} requests ({resumed} resumed), {checked} rows checked "
          f"({draft_rows} draft rows), complete SIDs {w.completed}")
    assert w.completed["direct"] > 0 and w.completed["reasoning"] > 0, w.completed
    assert draft_rows and resumed


if __name__ == "__main__":
    which, folder = sys.argv[1], sys.argv[2]
    {"v1": run_v1, "v2": run_v2}[which](folder)
