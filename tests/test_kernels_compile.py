"""Every Triton kernel compiles for the GPUs we target (sm_90: H100/H200), without a GPU.

The CPU suite runs kernels through Triton's interpreter, which accepts code the compiler rejects
(and the reverse). Compiling to a cubin here catches that before a GPU machine is lent. It runs
in a subprocess because interpreter mode is fixed when a kernel module is imported.
"""
import json
import os
import subprocess
import sys


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
    ("gream_fast.kernels.residual_quant", "_assign_kernel",
     {"x_ptr": "*fp32", "c_ptr": "*fp32", "cn_ptr": "*fp32", "idx_ptr": "*i64", "val_ptr": "*fp32",
      "N": "i32", "K": "i32", "D": "i32", "stride_x": "i32", "stride_c": "i32"},
     [{"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee"},
      {"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "tf32"}]),
    ("gream_fast.kernels.residual_quant", "_assign_kernel",
     {"x_ptr": "*bf16", "c_ptr": "*bf16", "cn_ptr": "*fp32", "idx_ptr": "*i64", "val_ptr": "*fp32",
      "N": "i32", "K": "i32", "D": "i32", "stride_x": "i32", "stride_c": "i32"},
     [{"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee"}]),
    ("gream_fast.kernels.residual_quant", "_encode_kernel",
     {"r_ptr": "*fp32", "cb_ptr": "*fp32", "cn_ptr": "*fp32", "codes_ptr": "*i64", "N": "i32",
      "K": "i32", "D": "i32", "L": "i32", "stride_r": "i32", "stride_cb_level": "i32",
      "stride_c": "i32"},
     [{"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "tf32"}]),
    ("gream_fast.kernels.residual_quant", "_centroid_update_kernel",
     {"x_ptr": "*bf16", "a_ptr": "*i64", "sums_ptr": "*fp32", "counts_ptr": "*fp32", "N": "i32",
      "D": "i32", "stride_x": "i32"},
     [{"BLOCK_N": 128, "BLOCK_D": 64}]),
]

SCRIPT = """
import importlib, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for module, name, signature, variants in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), name)
    for constexprs in variants:
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        try:
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                 target=GPUTarget("cuda", 90, 32))
            assert out.asm.get("cubin"), "no cubin"
        except Exception:
            print("FAIL", name, signature, constexprs, traceback.format_exc(limit=3))
"""


def test_every_kernel_compiles_for_sm90():
    # one process for all: importing torch and triton costs more than a compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(KERNELS)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAIL" not in out.stdout, out.stdout[-5000:]
