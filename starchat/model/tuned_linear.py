"""Decode products on a GPU: per weight shape, the faster of cuBLAS and starchat's Triton kernel,
timed on the GPU itself when a model loads.

Block sizes that suit one GPU do not suit every other, and a built-in guess can lose to cuBLAS.
So for each distinct Linear shape of the model, at 1 row (batch-1 decode), 16 rows (one 16-row
BLOCK_M pass, up to 16 sequences), 64 and 128 rows (decode batches of up to 64 and 128 sequences),
`tune_decode_products` times cuBLAS and a few block sizes of triton_linear's kernel, each
replayed in a CUDA graph as decode steps run them, and keeps the kernel only where it wins by
more than the noise. For int8 weights the product to beat is the portable one (the weight
dequantized per call, then cuBLAS). Everything else (more rows, prefill) stays on cuBLAS. The
choices are stored per GPU and software environment (tuning_cache.py), so later starts only check
them.

The MLP's first product can also apply the block's GELU (`fuse_gelu_into_products`): the Triton
kernel in its epilogue, cuBLAS through cuBLASLt's GELU epilogue (`torch._addmm_activation`),
which is checked against PyTorch's tanh GELU at load and else replaced by a separate GELU. For
those layers both sides are timed with the GELU included.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from starchat.model import triton_linear, tuning_cache
from starchat.model.quant import Int8Linear

logger = logging.getLogger("starchat.model")

DECODE_ROW_BUCKETS = (1, 16, 64, 128)  # a product of r rows uses the choice made for the first bucket >= r
# (BLOCK_N, BLOCK_K, num_warps) tried with 16-row tiles; few, since the first load compiles every
# one (cached on disk after)
CANDIDATES = ((16, 256, 4), (32, 128, 4), (32, 256, 4), (32, 256, 8), (64, 128, 4), (64, 256, 8))
# int8 tiles hold half the bytes of 16-bit ones: deeper tiles keep as many bytes in flight
INT8_CANDIDATES = CANDIDATES + ((16, 512, 8), (32, 512, 8), (32, 1024, 8))
# with 64-row tiles (buckets of more than 16 rows, int8 and 16-bit): the activation tile takes the
# registers that deeper weight tiles took above; these compile without spills for sm_90 with the
# Triton versions tested (tests/test_triton_compile.py)
WIDE_CANDIDATES = ((32, 64, 4), (32, 64, 8), (32, 128, 8), (64, 64, 8), (128, 64, 8))
# The row kernel's (BLOCK_N, BLOCK_K, num_warps, stages), also tried for one row: no spills and no
# barrier in the loop without stages (sm_90 machine code, tests/test_triton_compile.py); the
# pipelined ones keep more tiles in flight.
ROW_CANDIDATES = ((16, 256, 4, 1), (32, 256, 4, 1), (32, 512, 8, 1), (16, 256, 4, 3), (32, 256, 4, 3), (32, 512, 8, 2))
WIN_MARGIN = 0.97  # the kernel must take at most 97% of cuBLAS's time to replace it


def row_bucket(x: torch.Tensor) -> int | None:
    rows = x.numel() // x.shape[-1]
    return next((bucket for bucket in DECODE_ROW_BUCKETS if rows <= bucket), None)


class TunedLinear(nn.Linear):
    """An nn.Linear (same parameters) whose decode-sized products run triton_linear's kernel with
    the block sizes in `tuned` (row bucket -> blocks, or None: cuBLAS), and which can apply the
    tanh GELU to its output itself (`gelu_tanh=True`)."""

    tuned: dict

    def forward(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        blocks = self.tuned.get(row_bucket(x))
        if blocks is not None and triton_linear.supports(x):
            return triton_linear.linear(x, self.weight, None, self.bias, blocks, gelu_tanh=gelu_tanh)
        if gelu_tanh:
            return cublas_linear_gelu(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# Devices on which torch._addmm_activation was found to apply the tanh GELU (check_gelu_epilogue)
_EPILOGUE_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}


def cublas_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias): one cuBLASLt call with a GELU epilogue where that was
    checked on this device and dtype, else the product and a separate GELU."""
    if bias is not None and _EPILOGUE_CHECKED.get((x.device, x.dtype)):
        rows = x.reshape(-1, x.shape[-1])
        return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).reshape(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def check_gelu_epilogue(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._addmm_activation(use_gelu=True) computes the tanh GELU of the product on
    `device` at decode and prefill row counts (cuBLASLt's epilogue; PyTorch's own fallbacks may
    apply the exact GELU, and the op is private). Remembered for cublas_linear_gelu."""
    ok = hasattr(torch, "_addmm_activation")
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(96, 64, generator=generator, device=device).to(dtype)
    bias = torch.randn(96, generator=generator, device=device).to(dtype)
    for rows in (1, 16, 300) if ok else ():
        x = torch.randn(rows, 64, generator=generator, device=device).to(dtype)
        expected = F.gelu(F.linear(x.double(), weight.double(), bias.double()), approximate="tanh")
        try:
            fused = torch._addmm_activation(bias, x, weight.t(), use_gelu=True).double()
        except RuntimeError as error:
            logger.info("cuBLASLt GELU epilogue unavailable (%s): separate GELU", error)
            ok = False
            break
        # float32 tells the exact GELU from the tanh one (they differ by up to 5e-4); in 16 bits
        # that difference is below the rounding, and this checks for a GELU of the right product.
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        ok = torch.allclose(fused, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
        if not ok:
            logger.info("torch._addmm_activation does not give the tanh GELU at %d rows on %s: separate GELU", rows, device)
            break
    _EPILOGUE_CHECKED[(device, dtype)] = ok
    return ok


def fuse_gelu_into_products(model: nn.Module, dtype: torch.dtype) -> int:
    """Let every MLP with the tanh GELU apply it in its first product (c_fc becomes TunedLinear, or
    stays Int8Linear; both take gelu_tanh). Returns how many MLPs now do."""
    from starchat.model.gpt_bigcode import MLP

    device = next(model.parameters()).device
    check_gelu_epilogue(device, dtype)
    fused = 0
    for mlp in model.modules():
        if not isinstance(mlp, MLP) or not mlp.gelu_tanh:
            continue
        if type(mlp.c_fc) is nn.Linear:
            mlp.c_fc.__class__ = TunedLinear
            mlp.c_fc.tuned = {}
        if isinstance(mlp.c_fc, (TunedLinear, Int8Linear)):
            mlp.c_fc.gelu_epilogue = True  # tune_decode_products times it with the GELU
            mlp.fused_activation = True
            fused += 1
    return fused


def per_call_us(fn, device: torch.device, calls: int = 10, replays: int = 3) -> float:
    """Microseconds per call: replayed in a CUDA graph on a GPU (launch costs excluded, as in a
    captured decode step), timed on the host elsewhere (the interpreter in tests)."""
    for _ in range(2):
        fn()  # compiles Triton kernels outside any capture
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - start) / calls
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays * calls)


def reference_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None,
                      gelu: bool) -> torch.Tensor:
    """The product a kernel candidate must give, by PyTorch (int8 weights dequantized in x's
    dtype: a copy of one layer at most, the lm_head stays 16-bit)."""
    dense = weight.to(x.dtype) * scales.to(x.dtype)[:, None] if scales is not None else weight
    out = F.linear(x, dense, bias).float()
    return F.gelu(out, approximate="tanh") if gelu else out


def close_to(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the rounding of a 16-bit output and of a different summation order."""
    scale = expected.abs().max().item() or 1.0
    return bool(torch.isfinite(out).all()) and (out.float() - expected).abs().max().item() <= 2e-2 * scale


@torch.inference_mode()
def tune_decode_products(model: nn.Module, dtype: torch.dtype, candidates=None,
                         row_candidates=ROW_CANDIDATES, progress: bool = True) -> list[dict]:
    """Time and choose, for every Linear shape of `model` (16-bit nn.Linear or Int8Linear) on its
    device; 16-bit layers where the kernel wins become TunedLinear. `candidates`: the tiled
    kernel's blocks (default: CANDIDATES, or INT8_CANDIDATES for int8 weights, up to 16 rows;
    WIDE_CANDIDATES for more). One row also tries the row kernel (`row_candidates`). A candidate
    whose result differs from the PyTorch product by more than rounding is dropped (logged), so a
    kernel this GPU's compiler gets wrong never runs. Returns one report row per (shape, row
    bucket); its "cublas_us" is the product the kernel must beat (for int8 weights: dequantize +
    cuBLAS).

    With the default candidates, the choices are kept in the tuning cache (tuning_cache.py) and
    read back on later starts in the same environment, each chosen kernel checked once against
    PyTorch's product (report rows then have "cached": True); a layer whose stored choice fails
    that check is timed again."""
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    for module in model.modules():
        if type(module) in (nn.Linear, TunedLinear, Int8Linear):
            weight = module.weight
            gelu = getattr(module, "gelu_epilogue", False)
            groups[(weight.dtype, *weight.shape, module.bias is not None, gelu)].append(module)
    if not groups:
        return []
    device = next(iter(groups.values()))[0].weight.device
    default_candidates = candidates is None and row_candidates is ROW_CANDIDATES
    cache = tuning_cache.TuningCache(device, dtype) if default_candidates and tuning_cache.enabled() else None
    report = []
    to_time = []
    for group_key, modules in groups.items():
        entry = cache.get(tuning_cache.layer_key(*group_key)) if cache is not None else None
        if entry is not None and _choices_hold(modules[0], dtype, entry["choices"]):
            _apply(modules, entry["choices"])
            report += [{**row, "cached": True} for row in entry["report"]]
        else:
            if entry is not None:
                logger.warning("tuning cache: the stored choice for %s no longer computes the product on %s; "
                               "timing it again", tuning_cache.layer_key(*group_key), device)
            to_time.append((group_key, modules))
    if to_time:
        logger.info("timing decode products of %d layer shape(s) on %s against cuBLAS (%s)", len(to_time), device,
                    f"choices kept in {cache.path}" if cache is not None else "not cached")
    bar = tqdm(total=len(to_time) * len(DECODE_ROW_BUCKETS), desc="tuning decode products", unit="product",
               disable=not progress or not to_time, leave=False)
    with bar:
        for group_key, modules in to_time:
            choices, rows_report = _time_layer(modules[0], dtype, group_key[-1], candidates, row_candidates, bar)
            _apply(modules, choices)
            report += rows_report
            if cache is not None:
                cache.put(tuning_cache.layer_key(*group_key), choices, rows_report)
    if cache is not None:
        cache.save()
    for row in report:
        logger.info("decode product %s %s%s x %d rows: %s (kernel %.1f us, %scuBLAS %.1f us%s)", tuple(row["shape"]),
                    row["weight_dtype"], " + GELU" if row["gelu_epilogue"] else "", row["rows"], row["chosen"],
                    row["kernel_us"], "dequantize + " if row["weight_dtype"] == str(torch.int8) else "", row["cublas_us"],
                    "; tuned on an earlier start" if row.get("cached") else "")
    return report


def _apply(modules: list[nn.Module], choices: dict[int, tuple | None]) -> None:
    for module in modules:
        # every bucket named: None (PyTorch's product) also where no candidate ran on this GPU
        module.tuned = {rows: choices.get(rows) for rows in DECODE_ROW_BUCKETS}
        if type(module) is nn.Linear and any(module.tuned.values()):
            module.__class__ = TunedLinear


def _choices_hold(layer: nn.Module, dtype: torch.dtype, choices: dict[int, tuple | None]) -> bool:
    """Whether every kernel choice (read from the cache) runs and gives PyTorch's product at its
    row bucket; this compiles them too."""
    scales = layer.scales if isinstance(layer, Int8Linear) else None
    gelu = getattr(layer, "gelu_epilogue", False)
    for rows, blocks in choices.items():
        if blocks is None:
            continue
        x = torch.randn(rows, layer.weight.shape[1], device=layer.weight.device).to(dtype)
        try:
            if not (triton_linear.supports(x) and close_to(
                    triton_linear.linear(x, layer.weight, scales, layer.bias, blocks, gelu_tanh=gelu),
                    reference_product(x, layer.weight, scales, layer.bias, gelu))):
                return False
        except Exception as error:  # a configuration this GPU or Triton now rejects
            logger.debug("tuning cache: blocks %s failed (%s)", blocks, error)
            return False
    return True


def _time_layer(first: nn.Module, dtype: torch.dtype, gelu: bool, candidates, row_candidates,
                bar) -> tuple[dict[int, tuple | None], list[dict]]:
    """The choice per row bucket for one layer shape (None: PyTorch's product), and its report rows."""
    scales = first.scales if isinstance(first, Int8Linear) else None
    device = first.weight.device
    out_features, in_features = first.weight.shape
    choices: dict[int, tuple | None] = {}
    report = []
    for rows in DECODE_ROW_BUCKETS:
        bar.update(1)
        x = torch.randn(rows, in_features, device=device).to(dtype)
        if not triton_linear.supports(x):
            continue
        tiled = candidates or (WIDE_CANDIDATES if rows > 16 else INT8_CANDIDATES if scales is not None
                               else CANDIDATES)
        tried = [(triton_linear.block_rows(rows), *choice) for choice in tiled]
        if rows == 1 and triton_linear.row_kernel_fits(first.weight):
            tried += [(1, *choice) for choice in row_candidates]
        expected = reference_product(x, first.weight, scales, first.bias, gelu)
        timings = {}
        for blocks in tried:
            run = partial(triton_linear.linear, x, first.weight, scales, first.bias, blocks, gelu_tanh=gelu)
            try:
                if not close_to(run(), expected):
                    logger.warning("tuning %s: blocks %s give a wrong product on %s; not used",
                                   tuple(first.weight.shape), blocks, device)
                    continue
                timings[blocks] = per_call_us(run, device)
            except Exception as error:  # a configuration this GPU or Triton rejects: not a candidate
                logger.debug("tuning %s: blocks %s failed (%s)", tuple(first.weight.shape), blocks, error)
        if not timings:
            continue
        best = min(timings, key=timings.get)
        if scales is not None:  # int8: dequantize + cuBLAS
            cublas = partial(first.dequantized_product, x, gelu)
        elif gelu:
            cublas = partial(cublas_linear_gelu, x, first.weight, first.bias)
        else:
            cublas = partial(F.linear, x, first.weight, first.bias)
        cublas_us = per_call_us(cublas, device)
        wins = timings[best] < WIN_MARGIN * cublas_us
        choices[rows] = best if wins else None
        report.append({"shape": (out_features, in_features), "weight_dtype": str(first.weight.dtype), "rows": rows,
                       "gelu_epilogue": gelu, "kernel_us": timings[best], "blocks": best, "cublas_us": cublas_us,
                       "chosen": "triton" if wins else "cublas"})
    return choices, report
