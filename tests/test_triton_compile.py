"""starchat's Triton kernels compiled for real GPUs (sm_80, sm_86, sm_90) on a machine without one.

The interpreter (tests/test_triton_kernels.py) runs the kernels' arithmetic but not the compiler:
code it accepts can still fail to compile, spill registers or ask for more shared memory than a
GPU gives one program. Triton's wheel ships ptxas and cuobjdump, so the compile and the resource
figures are checked here, for each dtype at StarChat-beta's shapes and at small ones.
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, runs nothing")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from starchat.model.triton_support import FUSED_MULTIPLY_ADD  # noqa: E402

# Shared memory one program may use: sm_86/sm_89 99 KB, sm_80 163 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
TRITON_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def compile_kernel(kernel, types: dict[str, str], constexprs: dict, capability: int, num_warps: int,
                   aligned: tuple[str, ...] = (), launch_pdl: bool = False):
    """`aligned`: arguments known to be multiples of 16 (pointers: 16-byte aligned), as Triton
    specializes them when launched with such values; vector loads depend on it. Constexpr
    arguments left out take the kernel's defaults."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(kernel.fn).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    constexprs = {name: value for name, value in defaults.items() if name not in types} | constexprs
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in kernel.arg_names}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    options = {"num_warps": num_warps} | FUSED_MULTIPLY_ADD | ({"launch_pdl": True} if launch_pdl else {})
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32), options=options)


def _cuobjdump(compiled, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def loop_instructions(compiled) -> list[str]:
    """The machine instructions (opcodes) of the kernel's innermost loop: from a backward branch's
    target to the branch."""
    code = []
    for line in _cuobjdump(compiled, "--dump-sass").splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if match:
            code.append((int(match.group(1), 16), match.group(2), match.group(3)))
    loops = []
    for address, opcode, operands in code:
        target = re.match(r"\s*0x([0-9a-f]+)", operands)  # cuobjdump prints branch targets as addresses
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append([op for at, op, _ in code if int(target.group(1), 16) <= at <= address])
    assert loops, "no loop found in the kernel's machine code"
    return min(loops, key=len)


def spilled_bytes(compiled) -> int:
    """Per-thread stack (register spills) of the compiled kernel, from cuobjdump."""
    return int(re.search(r"STACK:(\d+)", _cuobjdump(compiled, "--dump-resource-usage")).group(1))


@pytest.mark.parametrize("capability", [80, 86, 90])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("group,head_dim", [(48, 128), (1, 64), (12, 64)])  # StarChat MQA, MHA, tiny_starcoder
def test_decode_attention_compiles_within_limits(capability, dtype, group, head_dim):
    import torch

    from starchat.model import triton_attention

    launch = triton_attention.launch_settings(getattr(torch, dtype), group, head_dim)
    element = TRITON_TYPE[dtype]
    types = {name: f"*{element}" for name in ("query_ptr", "key_ptr", "value_ptr", "cache_ptr", "out_ptr")}
    types |= {"tables_ptr": "*i64", "lengths_ptr": "*i64", "scale": "fp32"}
    types |= {name: "*fp32" for name in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")}
    types |= {name: "i32" for name in ("stride_query", "stride_new", "stride_cache_kv", "stride_slot", "stride_table",
                                       "stride_out", "tokens_per_split", "num_splits")}
    for single_split in (True, False):
        constexprs = dict(NUM_KV_HEADS=1, GROUP=group, HEAD_DIM=head_dim, CACHE_BLOCK=16, SINGLE_SPLIT=single_split,
                          **launch.constexprs)
        compiled = compile_kernel(triton_attention._decode_split, types, constexprs, capability, launch.num_warps)
        assert compiled.metadata.shared <= SHARED_LIMIT[capability]
        assert spilled_bytes(compiled) == 0
    merge_types = {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "out_ptr": f"*{element}",
                   "stride_out": "i32", "num_splits": "i32"}
    constexprs = dict(NUM_KV_HEADS=1, GROUP=group, HEAD_DIM=head_dim, BLOCK_S=16, BLOCK_D=launch.constexprs["BLOCK_D"])
    assert spilled_bytes(compile_kernel(triton_attention._merge_splits, merge_types, constexprs, capability, 1)) == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("width", [6144, 64])
def test_add_layer_norm_compiles_without_spills(dtype, width):
    from starchat.model import triton_layer_norm

    block, warps = triton_layer_norm.launch_settings(width)
    element = TRITON_TYPE[dtype]
    types = {name: f"*{element}" for name in ("hidden_ptr", "delta_ptr", "weight_ptr", "bias_ptr", "sum_ptr", "out_ptr")}
    types |= {"width": "i32", "eps": "fp32"} | {name: "i32" for name in ("stride_hidden", "stride_delta", "stride_sum",
                                                                          "stride_out")}
    for has_delta in (True, False):
        compiled = compile_kernel(triton_layer_norm._add_layer_norm, types, dict(HAS_DELTA=has_delta, BLOCK=block), 90, warps)
        assert spilled_bytes(compiled) == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("rows", [1, 16, 17, 33, 64, 128])
def test_weight_product_compiles_within_limits(dtype, rows):
    import torch

    from starchat.model import triton_linear

    element = TRITON_TYPE[dtype]
    types = {"x_ptr": f"*{element}", "w_ptr": "*i8", "scales_ptr": f"*{element}", "bias_ptr": f"*{element}",
             "out_ptr": f"*{element}"} | {name: "i32" for name in ("M", "N", "K", "stride_x", "stride_w", "stride_out")}
    # StarChat-beta's c_attn, MLP up and down projections, lm_head
    for out_features, in_features in ((6400, 6144), (24576, 6144), (6144, 24576), (49152, 6144)):
        gelu = out_features == 24576  # the up projection applies the GELU
        block_m, block_n, block_k, warps = triton_linear._blocks(rows, out_features, in_features, getattr(torch, dtype))
        constexprs = dict(HAS_SCALES=True, HAS_BIAS=True, PRECISION="ieee" if dtype == "float32" else "tf32", BLOCK_M=block_m,
                          BLOCK_N=block_n, BLOCK_K=block_k, GELU_TANH=gelu, ROW_BLOCKS_FIRST=rows > block_m)
        compiled = compile_kernel(triton_linear._weight_product, types, constexprs, 90, warps)
        assert compiled.metadata.shared <= SHARED_LIMIT[90]
        assert spilled_bytes(compiled) == 0, (out_features, in_features)


# what a StarChat-beta layer passes: 16-byte aligned tensors, widths and strides multiples of 16
ROW_ALIGNED = ("x_ptr", "w_ptr", "scales_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_x", "stride_w", "stride_out")


@pytest.mark.parametrize("weight_type", ["bf16", "i8"])
def test_tuning_candidates_compile_without_spills(weight_type):
    from starchat.model import triton_linear, tuned_linear

    types = {"x_ptr": "*bf16", "w_ptr": f"*{weight_type}", "scales_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    types |= {name: "i32" for name in ("M", "N", "K", "stride_x", "stride_w", "stride_out")}
    narrow = tuned_linear.INT8_CANDIDATES if weight_type == "i8" else tuned_linear.CANDIDATES
    # (blocks, row blocks first): up to 16 rows one row block; 64 rows one, 128 rows two
    tried = [((16, *blocks), False) for blocks in narrow]
    tried += [((triton_linear.ROWS_PER_PASS, *blocks), first) for blocks in tuned_linear.WIDE_CANDIDATES
              for first in (False, True)]
    # as launched for StarChat-beta's layers (aligned: Triton then pipelines the loads through more
    # shared memory) and for its lm_head (49,156 outputs: N and the output's stride not multiples of 16)
    layouts = (ROW_ALIGNED, tuple(name for name in ROW_ALIGNED if name not in ("N", "stride_out")))
    for ((block_m, block_n, block_k, warps), first), gelu, aligned in itertools.product(tried, (False, True), layouts):
        constexprs = dict(HAS_SCALES=weight_type == "i8", HAS_BIAS=True, PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_K=block_k, GELU_TANH=gelu, ROW_BLOCKS_FIRST=first)
        compiled = compile_kernel(triton_linear._weight_product, types, constexprs, 90, warps, aligned=aligned)
        assert compiled.metadata.shared <= SHARED_LIMIT[90]
        assert spilled_bytes(compiled) == 0, (block_m, block_n, block_k, warps, first, gelu, len(aligned))


ROW_TYPES = {"x_ptr": "*bf16", "scales_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"} | {
    name: "i32" for name in ("N", "K", "stride_x", "stride_w", "stride_out")}


@pytest.mark.parametrize("weight_type", ["bf16", "i8"])
def test_row_kernel_candidates_compile_without_spills(weight_type):
    from starchat.model import triton_linear, tuned_linear

    for (block_n, block_k, warps, stages), gelu in itertools.product(tuned_linear.ROW_CANDIDATES, (False, True)):
        constexprs = dict(HAS_SCALES=weight_type == "i8", HAS_BIAS=True, GELU_TANH=gelu, BLOCK_N=block_n, BLOCK_K=block_k,
                          EVEN_N=True, EVEN_K=True, STAGES=stages)
        compiled = compile_kernel(triton_linear._row_product, ROW_TYPES | {"w_ptr": f"*{weight_type}"}, constexprs, 90,
                                  warps, aligned=ROW_ALIGNED)
        assert compiled.metadata.shared <= SHARED_LIMIT[90]
        assert spilled_bytes(compiled) == 0, (block_n, block_k, warps, stages, gelu)


def test_row_kernel_spends_few_instructions_per_int8_weight():
    """The row kernel's instruction budget: at 1 byte per weight, an H200's 4.2 TB/s bring each
    of its 132 SMs (1.98 GHz) 16 weights per clock, while an SM issues 128 thread instructions
    per clock: 8 instructions per weight at most, everything included, or the kernel cannot keep
    up with memory. Its int8 loop must stay well under that (wide words, sign flip and exponent
    trick instead of conversion instructions, which run at 16 per SM and clock; no masks on even
    shapes): below 5.5 without pipeline stages, below 6.5 with them (their shared-memory round
    trip)."""
    from starchat.model import triton_linear, tuned_linear

    types = ROW_TYPES | {"w_ptr": "*i8"}
    for block_n, block_k, warps, stages in tuned_linear.ROW_CANDIDATES:
        constexprs = dict(HAS_SCALES=True, HAS_BIAS=True, GELU_TANH=False, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=True,
                          EVEN_K=True, STAGES=stages)
        compiled = compile_kernel(triton_linear._row_product, types, constexprs, 90, warps, aligned=ROW_ALIGNED)
        loop = loop_instructions(compiled)
        weights_per_thread = block_n * block_k / (32 * warps)
        assert len(loop) / weights_per_thread < (5.5 if stages == 1 else 6.5), (block_n, block_k, warps, stages, len(loop))
        assert not any(op.startswith(("I2F", "F2F")) for op in loop)


@pytest.mark.parametrize("weight_type", ["bf16", "i8"])
def test_wide_tiles_use_hoppers_warpgroup_products(weight_type):
    """The 64-row tiles of 64- and 128-row decode batches, where products turn compute-heavy, must
    compile on sm_90 to wgmma (HGMMA in the machine code) fed by asynchronous copies (LDGSTS), not
    to the older per-warp mma.sync (HMMA) that 16-row tiles use."""
    from starchat.model import triton_linear, tuned_linear

    types = {"x_ptr": "*bf16", "w_ptr": f"*{weight_type}", "scales_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    types |= {name: "i32" for name in ("M", "N", "K", "stride_x", "stride_w", "stride_out")}
    for block_n, block_k, warps in tuned_linear.WIDE_CANDIDATES:
        constexprs = dict(HAS_SCALES=weight_type == "i8", HAS_BIAS=True, PRECISION="tf32", BLOCK_M=triton_linear.ROWS_PER_PASS,
                          BLOCK_N=block_n, BLOCK_K=block_k, GELU_TANH=False, ROW_BLOCKS_FIRST=True)
        compiled = compile_kernel(triton_linear._weight_product, types, constexprs, 90, warps, aligned=ROW_ALIGNED)
        opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", _cuobjdump(compiled, "--dump-sass"))
        assert "HGMMA" in opcodes and "HMMA" not in opcodes and "LDGSTS" in opcodes, (block_n, block_k, warps)


MEMORY_OPCODES = ("LDG", "LDGSTS", "STG", "ATOMG", "RED", "LD", "ST", "UBLKCP", "UTMALDG")


def test_dependent_launch_waits_before_any_memory_access():
    """With USE_PDL (STARCHAT_PDL=1 on Hopper) every kernel of a decode step may start before the
    kernel it follows has finished; each must wait (griddepcontrol.wait: ACQBULK in sm_90 machine
    code) before its first global load or store, and then let the next kernel launch (PREEXIT). The
    products prefetch their first weight tile into L2 before waiting (CCTL: weights do not depend on
    the kernel before)."""
    import torch

    from starchat.model import triton_attention, triton_layer_norm, triton_linear

    bf16 = {name: "*bf16" for name in ("x_ptr", "w_ptr", "scales_ptr", "bias_ptr", "out_ptr")}
    product_types = bf16 | {name: "i32" for name in ("M", "N", "K", "stride_x", "stride_w", "stride_out")}
    launch = triton_attention.launch_settings(torch.bfloat16, 48, 128)
    attention_types = {name: "*bf16" for name in ("query_ptr", "key_ptr", "value_ptr", "cache_ptr", "out_ptr")}
    attention_types |= {"tables_ptr": "*i64", "lengths_ptr": "*i64", "scale": "fp32"}
    attention_types |= {name: "*fp32" for name in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")}
    attention_types |= {name: "i32" for name in ("stride_query", "stride_new", "stride_cache_kv", "stride_slot",
                                                 "stride_table", "stride_out", "tokens_per_split", "num_splits")}
    norm_types = {name: "*bf16" for name in ("hidden_ptr", "delta_ptr", "weight_ptr", "bias_ptr", "sum_ptr", "out_ptr")}
    norm_types |= {"width": "i32", "eps": "fp32"} | {name: "i32" for name in ("stride_hidden", "stride_delta",
                                                                              "stride_sum", "stride_out")}
    product = dict(HAS_SCALES=False, HAS_BIAS=True, PRECISION="tf32", GELU_TANH=True)
    kernels = [
        (triton_linear._weight_product, product_types,
         product | dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, PREFETCH_LINES=4), 4),
        (triton_linear._weight_product, product_types | {"w_ptr": "*i8"},
         product | dict(HAS_SCALES=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, ROW_BLOCKS_FIRST=True), 8),
        (triton_linear._row_product, ROW_TYPES | {"w_ptr": "*i8"},
         dict(HAS_SCALES=True, HAS_BIAS=True, GELU_TANH=False, BLOCK_N=32, BLOCK_K=256, EVEN_N=True, EVEN_K=True,
              STAGES=3, PREFETCH_LINES=2), 4),
        (triton_linear._row_product, ROW_TYPES | {"w_ptr": "*bf16"},
         dict(HAS_SCALES=False, HAS_BIAS=True, GELU_TANH=True, BLOCK_N=16, BLOCK_K=256, EVEN_N=False, EVEN_K=True,
              PREFETCH_LINES=4), 4),
        (triton_layer_norm._add_layer_norm, norm_types, dict(HAS_DELTA=True, BLOCK=8192), 16),
        (triton_attention._decode_split, attention_types,
         dict(NUM_KV_HEADS=1, GROUP=48, HEAD_DIM=128, CACHE_BLOCK=16, SINGLE_SPLIT=False, **launch.constexprs),
         launch.num_warps),
        (triton_attention._merge_splits, {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                                          "out_ptr": "*bf16", "stride_out": "i32", "num_splits": "i32"},
         dict(NUM_KV_HEADS=1, GROUP=48, HEAD_DIM=128, BLOCK_S=16, BLOCK_D=128), 1),
    ]
    for kernel, types, constexprs, warps in kernels:
        # aligned as StarChat-beta's layers launch the products: Triton then pipelines their loads,
        # which must stay after the wait too
        aligned = tuple(name for name in ROW_ALIGNED if name in types) if "product" in kernel.fn.__name__ else ()
        plain = compile_kernel(kernel, types, constexprs, 90, warps, aligned=aligned)
        dependent = compile_kernel(kernel, types, constexprs | {"USE_PDL": True}, 90, warps, aligned=aligned,
                                   launch_pdl=True)
        assert dependent.metadata.launch_pdl and not plain.metadata.launch_pdl
        opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                             _cuobjdump(dependent, "--dump-sass"))
        bases = [opcode.split(".")[0] for opcode in opcodes]
        assert "ACQBULK" in bases and "PREEXIT" in bases, kernel.fn.__name__
        first_access = min(i for i, base in enumerate(bases) if base in MEMORY_OPCODES)
        assert bases.index("ACQBULK") < first_access, (kernel.fn.__name__, opcodes[:first_access + 1])
        assert bases.index("ACQBULK") < bases.index("PREEXIT")
        if "product" in kernel.fn.__name__:  # the first weight tile prefetched into L2 before waiting
            assert "CCTL" in bases[:bases.index("ACQBULK")], kernel.fn.__name__
        plain_opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                                   _cuobjdump(plain, "--dump-sass"))
        assert "ACQBULK" not in plain_opcodes and spilled_bytes(dependent) == spilled_bytes(plain) == 0
