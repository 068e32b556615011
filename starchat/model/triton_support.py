"""When starchat's Triton kernels run: Triton installed and a CUDA GPU of compute capability 8.0
or newer (bfloat16 tensor-core dot products), or `TRITON_INTERPRET=1` on any device (the tests run
the kernels that way on the CPU). Everywhere else the PyTorch path of the same step runs; setting
`STARCHAT_TRITON_KERNELS=0` picks it on a GPU too (to rule the kernels out when debugging, and for
the benchmarks' same-run baseline).

`STARCHAT_PDL=1` (Hopper and newer; off by default until measured on a GPU) launches the kernels as
programmatic dependents: each may be launched, and its programs placed on the SMs, while the
kernel before it is still running; a program waits for that kernel to finish (and its writes to
be visible) before it reads or writes anything, then lets the next kernel launch. A decode step
of StarChat-beta is some 300 short kernels in a row, and this hides the gap between them."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # PyTorch's CPU builds come without Triton
    triton = None
try:  # grid dependency control (Triton 3.3 and newer)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


# Read when a model is loaded (the runner decides then which decode addressing to build).
ENABLED = os.environ.get("STARCHAT_TRITON_KERNELS", "1") != "0"
# Read at every launch (CUDA graphs keep what their capture launched).
PDL_ENABLED = os.environ.get("STARCHAT_PDL", "0") == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_supported(index: int) -> bool:
    return _capability(index)[0] >= 8


# Multiplies and adds fused into FMAs, as Triton has compiled them by default so far (Triton 3.9
# warns that 3.10 will not unless asked): the kernels' instruction budgets and their tested
# numerics assume them, so every launch asks.
FUSED_MULTIPLY_ADD = {"enable_fp_fusion": True}


def launch_options(device: torch.device) -> dict:
    """Launch arguments of every starchat kernel on `device`: fused multiply-adds, and dependent
    launch where it is on."""
    return FUSED_MULTIPLY_ADD | dependent_launch(device)


def dependent_launch(device: torch.device, requested: bool | None = None) -> dict:
    """Launch arguments for a starchat kernel on `device`: {"USE_PDL": True, "launch_pdl": True}
    where kernels launch as programmatic dependents (PDL_ENABLED, or `requested`; sm_90 or newer,
    Triton with grid dependency control), else none (the kernels' USE_PDL=False)."""
    wanted = PDL_ENABLED if requested is None else requested
    if not wanted or gdc_wait is None or interpreting() or device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"USE_PDL": True, "launch_pdl": True} if _capability(index)[0] >= 9 else {}


if triton is not None:
    import triton.language as tl

    @triton.jit
    def wait_for_previous_kernel(USE_PDL: tl.constexpr):
        """Called first by every starchat kernel: with USE_PDL, wait until the kernel before has
        finished and its writes are visible, then let the next kernel launch (its programs will wait
        here in turn). Nothing before this call may read or write memory (the product kernels only
        prefetch their first weight tile into L2 before it)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_into_l2(pointers):
        """Ask for the memory line at each of `pointers` to be brought into the L2 cache: no load
        into registers, nothing waits for it (so it may come before wait_for_previous_kernel)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [pointers], dtype=tl.int32,
                                  is_pure=False, pack=1)
else:
    wait_for_previous_kernel = prefetch_into_l2 = None


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can take tensors on `device`."""
    if triton is None or not ENABLED:
        return False
    if interpreting():
        return True
    return device.type == "cuda" and _device_supported(device.index or 0)


def check_kernels(config, dtype: torch.dtype, device: torch.device) -> bool:
    """Run the decode-attention and add+LayerNorm kernels once at the model's shapes against the
    PyTorch path; on an error or a wrong result, log why and turn the kernels off for this process
    (ENABLED = False), so that a Triton build that miscompiles or rejects them costs speed, never
    a wrong token or a crash. Also compiles them before the first request. True if they stay on."""
    import logging

    import torch.nn.functional as F

    from starchat.model import triton_attention, triton_layer_norm
    from starchat.model.attention import AttentionMetadata, paged_attention

    global ENABLED
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        block_size, lengths = 16, [70, 1]  # two tiles and a partial one; the new token alone
        num_seqs, num_blocks = len(lengths), 2 * 5 + 1
        tables = torch.arange(num_seqs * 5, device=device).flip(0).view(num_seqs, 5)  # blocks out of order
        cache = torch.randn(2, num_blocks * block_size, config.kv_dim, generator=generator, device=device).to(dtype)
        qkv = torch.randn(num_seqs, config.n_embd + 2 * config.kv_dim, generator=generator, device=device).to(dtype)
        query, key, value = qkv.split((config.n_embd, config.kv_dim, config.kv_dim), dim=1)
        context_lens = torch.tensor(lengths, device=device)
        positions = context_lens - 1
        slots = tables.gather(1, (positions // block_size)[:, None]).squeeze(1) * block_size + positions % block_size
        scale = 1.0 / config.head_dim ** 0.5
        addressing = dict(slot_mapping=slots, num_decode_tokens=num_seqs, prefill_chunks=[], block_size=block_size,
                          decode_block_tables=tables, decode_context_lens=context_lens, decode_max_context=80)
        reads = AttentionMetadata(**addressing)
        reads.decode_reads()
        expected = paged_attention(query, key, value, cache.clone(), AttentionMetadata(
            **{**addressing, "decode_block_tables": None}, decode_gather_slots=reads.decode_gather_slots,
            decode_mask=reads.decode_mask), config.n_head, config.num_kv_heads, scale).float()
        actual = triton_attention.decode_attention(query, key, value, cache, tables, context_lens, 80, block_size,
                                                   config.n_head, config.num_kv_heads, scale).float()
        hidden, delta = (torch.randn(3, config.n_embd, generator=generator, device=device).to(dtype) for _ in range(2))
        weight, bias = (torch.randn(config.n_embd, generator=generator, device=device).to(dtype) for _ in range(2))
        summed, normed = triton_layer_norm.add_layer_norm(hidden, delta, weight, bias, config.layer_norm_epsilon)
        reference = F.layer_norm(hidden + delta, (config.n_embd,), weight, bias, config.layer_norm_epsilon).float()
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        problems = [name for name, got, want in (("decode attention", actual, expected), ("add+LayerNorm", normed.float(), reference))
                    if not torch.allclose(got, want, rtol=tolerance, atol=tolerance * max(1.0, want.abs().max().item()))]
        if not torch.equal(summed, hidden + delta):
            problems.append("residual add")
        if problems:
            raise RuntimeError(f"wrong results from {', '.join(problems)}")
        return True
    except Exception as error:  # a kernel that cannot run here must not stop the server
        logging.getLogger("starchat.model").warning(
            "starchat's Triton kernels are off for this process (%s: %s); PyTorch's kernels run instead. "
            "Set STARCHAT_TRITON_KERNELS=0 to skip this check.", type(error).__name__, error)
        ENABLED = False
        return False
