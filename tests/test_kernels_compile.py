"""Every Triton kernel compiles for the GPUs we target (sm_90: H100/H200), without a GPU.

The CPU suite runs kernels through Triton's interpreter, which accepts code the compiler rejects
(and the reverse). Compiling to a cubin here catches that before a GPU machine is lent. It runs
in a subprocess because interpreter mode is fixed when a kernel module is imported.
"""
import json
import os
import subprocess
import sys

import pytest

# (module, kernel, signature, constexpr variants)
KERNELS = [
    ("gream_fast.kernels.group_advantage", "_group_advantage_kernel",
     {"rewards_ptr": "*fp32", "groups_ptr": "*i64", "mask_ptr": "*u8", "out_ptr": "*fp32",
      "R": "i32", "T": "i32", "stride_mask": "i32", "stride_out": "i32", "eps": "fp32"},
     [{"K": 4, "HAS_MASK": False, "BLOCK_R": 128, "BLOCK_T": 64},
      {"K": 1, "HAS_MASK": True, "BLOCK_R": 128, "BLOCK_T": 64}]),
    ("gream_fast.kernels.group_advantage", "_group_advantage_kernel",  # bf16 rewards, int32 ids
     {"rewards_ptr": "*bf16", "groups_ptr": "*i32", "mask_ptr": "*fp32", "out_ptr": "*fp32",
      "R": "i32", "T": "i32", "stride_mask": "i32", "stride_out": "i32", "eps": "fp32"},
     [{"K": 4, "HAS_MASK": True, "BLOCK_R": 128, "BLOCK_T": 64}]),
]

SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, name, signature, variants = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), name)
for constexprs in variants:
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                         target=GPUTarget("cuda", 90, 32))
    assert out.asm.get("cubin"), "no cubin"
print("ok")
"""


@pytest.mark.parametrize("spec", KERNELS, ids=[f"{k[1]}-{k[2]['rewards_ptr']}" for k in KERNELS])
def test_compiles_for_sm90(spec):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
