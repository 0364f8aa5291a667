"""Every Triton kernel compiles for the GPUs we target (sm_90: H100/H200), without a GPU.

The CPU suite runs kernels through Triton's interpreter, which accepts code the compiler rejects
(and the reverse). Compiling to a cubin here catches that before a GPU machine is lent. It runs
in a subprocess because interpreter mode is fixed when a kernel module is imported.
"""
import json
import os
import subprocess
import sys


PREFIX_ATTENTION_TENSORS = ("q_ptr", "pk_ptr", "pv_ptr", "sk_ptr", "sv_ptr", "o_ptr")
PARTIALS = {"pm_ptr": "*fp32", "pl_ptr": "*fp32", "pacc_ptr": "*fp32"}  # split softmax states
PREFIX_ATTENTION_SIG = {  # the non-tensor arguments (dicts keep the kernel's argument order)
    "q_ptr": None, "pk_ptr": None, "pv_ptr": None, "prefix_cu_ptr": "*i32", "row_cu_ptr": "*i32",
    "sk_ptr": None, "sv_ptr": None, "slen_ptr": "*i32", "o_ptr": None, **PARTIALS,
    "num_splits": "i32", "D": "i32", "qk_scale": "fp32", **{f"stride_{n}": "i32" for n in (
        "qr", "qh", "pkt", "pkh", "pvt", "pvh", "skr", "sks", "skh", "svr", "svs", "svh", "or", "oh",
        "ms", "mr", "as", "ar", "ah")}}
PREFIX_PARTIAL_SIG = {
    "q_ptr": None, "pk_ptr": None, "pv_ptr": None, "prefix_cu_ptr": "*i32", "row_cu_ptr": "*i32",
    **PARTIALS, "D": "i32", "qk_scale": "fp32", **{f"stride_{n}": "i32" for n in (
        "qr", "qh", "pkt", "pkh", "pvt", "pvh", "ms", "mr", "as", "ar", "ah")}}

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
    ("gream_fast.kernels.trie_logits", "_trie_topk_kernel",
     {"logits_ptr": "*bf16", "nodes_ptr": "*i32", "indptr_ptr": "*i32", "tokens_ptr": "*i32",
      "scores_ptr": "*fp32", "token_ids_ptr": "*i64", "child_ptr": "*i32", "V": "i32",
      "stride_row": "i32", "num_nodes": "i32", "token_offset": "i32", "max_children": "i32",
      "K": "i32"},
     [{"BLOCK_V": 1024, "BLOCK_C": 256, "BLOCK_K": 16},
      {"BLOCK_V": 1024, "BLOCK_C": 256, "BLOCK_K": 256},
      {"BLOCK_V": 256, "BLOCK_C": 256, "BLOCK_K": 16}]),
    ("gream_fast.kernels.trie_logits", "_trie_topk_kernel",  # fp32 logits, int64 node ids
     {"logits_ptr": "*fp32", "nodes_ptr": "*i64", "indptr_ptr": "*i32", "tokens_ptr": "*i32",
      "scores_ptr": "*fp32", "token_ids_ptr": "*i64", "child_ptr": "*i32", "V": "i32",
      "stride_row": "i32", "num_nodes": "i32", "token_offset": "i32", "max_children": "i32",
      "K": "i32"},
     [{"BLOCK_V": 1024, "BLOCK_C": 32, "BLOCK_K": 16}]),
    ("gream_fast.kernels.prefix_attention", "_prefix_attention_kernel",
     {**PREFIX_ATTENTION_SIG, **{k: "*bf16" for k in PREFIX_ATTENTION_TENSORS}},
     [{"G": 1, "GP": 1, "BLOCK_R": 64, "BLOCK_T": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee", "SPLIT": False},
      {"G": 4, "GP": 4, "BLOCK_R": 16, "BLOCK_T": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee", "SPLIT": False},
      {"G": 1, "GP": 1, "BLOCK_R": 32, "BLOCK_T": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee", "SPLIT": False},
      {"G": 7, "GP": 8, "BLOCK_R": 4, "BLOCK_T": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee", "SPLIT": False},
      {"G": 8, "GP": 8, "BLOCK_R": 4, "BLOCK_T": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee", "SPLIT": True},
      {"G": 1, "GP": 1, "BLOCK_R": 32, "BLOCK_T": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee", "SPLIT": True}]),
    ("gream_fast.kernels.prefix_attention", "_prefix_attention_kernel",
     {**PREFIX_ATTENTION_SIG, **{k: "*fp32" for k in PREFIX_ATTENTION_TENSORS}},
     [{"G": 2, "GP": 2, "BLOCK_R": 8, "BLOCK_T": 16, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee", "SPLIT": False},
      {"G": 1, "GP": 1, "BLOCK_R": 16, "BLOCK_T": 16, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee", "SPLIT": False},
      {"G": 2, "GP": 2, "BLOCK_R": 8, "BLOCK_T": 16, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee", "SPLIT": True}]),
    ("gream_fast.kernels.prefix_attention", "_prefix_partial_kernel",
     {**PREFIX_PARTIAL_SIG, **{k: "*bf16" for k in ("q_ptr", "pk_ptr", "pv_ptr")}},
     [{"G": 8, "GP": 8, "BLOCK_R": 4, "BLOCK_T": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee"},
      {"G": 7, "GP": 8, "BLOCK_R": 4, "BLOCK_T": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "ieee"},
      {"G": 1, "GP": 1, "BLOCK_R": 64, "BLOCK_T": 64, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee"}]),
    ("gream_fast.kernels.prefix_attention", "_prefix_partial_kernel",
     {**PREFIX_PARTIAL_SIG, **{k: "*fp32" for k in ("q_ptr", "pk_ptr", "pv_ptr")}},
     [{"G": 2, "GP": 2, "BLOCK_R": 8, "BLOCK_T": 16, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "ieee"}]),
    ("gream_fast.kernels.sid_logprob", "_lse_gather_kernel",
     {"z_ptr": "*fp32", "tok_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32",
      "K": "i32", "stride_z": "i32"},
     [{"BLOCK_N": 16, "BLOCK_K": 256}]),
    ("gream_fast.kernels.sid_logprob", "_softmax_grad_kernel",
     {"z_ptr": "*fp32", "tok_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32", "dz_ptr": "*fp32",
      "N": "i32", "K": "i32", "stride_z": "i32", "stride_dz": "i32"},
     [{"BLOCK_N": 16, "BLOCK_K": 256}]),
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
