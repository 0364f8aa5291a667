"""Named ranges around the engine's phases, for the users who profile: each is a
torch.profiler.record_function (it names the phase in a Chrome / Perfetto trace of
torch.profiler) and, on a CUDA machine, an NVTX range (it names the phase in Nsight Systems).
Outside a profiler both cost well under a microsecond.

The phases: gream.prefill, gream.decode (one step of every live row), gream.trie_mask (the
trie's children: mask, log-softmax, top-k or sample), gream.reason.step (a reasoning step:
sample, phases, marker), gream.rollout, gream.reward, gream.advantage, gream.logprob_pass (a
packed forward over groups: reference or policy), gream.loss, gream.backward,
gream.optimizer.
"""
import contextlib

import torch


@contextlib.contextmanager
def phase(name: str):
    """A range named `name` around the block (record_function, and NVTX on CUDA)."""
    with torch.profiler.record_function(name):
        nvtx = torch.cuda.is_available()
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def trace(path):
    """A torch.profiler context over CPU (and CUDA) activity that writes a Chrome / Perfetto
    trace to `path` (a .json file) when it ends."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts,
                                  on_trace_ready=lambda prof: prof.export_chrome_trace(str(path)))
