"""One layer's decode attention, add+LayerNorm and MLP up projection + GELU at StarChat-beta's
shapes: starchat's kernels against the PyTorch path they replace, in the same run on the same GPU.

Each variant is captured in a CUDA graph as 40 back-to-back calls (a decode step calls it once
per layer, inside a graph) and replayed; the figure is time per call. Attention also reports the
bytes of cached keys and values it reads per second.

    python3 bench/gpu_kernels.py --json $OUT/gpu_kernels.json      # on a GPU, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.model import AttentionMetadata, triton_attention, triton_layer_norm, triton_linear  # noqa: E402
from starchat.model.attention import paged_attention  # noqa: E402
from starchat.model.tuned_linear import check_gelu_epilogue, cublas_linear_gelu  # noqa: E402
from starchat.model.tuned_linear import per_call_us as graph_per_call_us  # noqa: E402

CALLS_PER_GRAPH = 40  # StarChat-beta's layers
HEADS, KV_HEADS, HEAD_DIM, WIDTH, BLOCK = 48, 1, 128, 6144, 16
ATTENTION_CASES = [(1, 512), (1, 2048), (8, 1024), (32, 512), (128, 256), (128, 1024)]  # (sequences, context)
NORM_ROWS = [1, 8, 32, 128]
INNER = 24576  # the MLP's width
GELU_ROWS = [1, 16, 2048]  # batch-1 decode, a 16-sequence decode, a 2,048-token prompt


def per_call_us(fn) -> float:
    """Microseconds per call of fn, captured CALLS_PER_GRAPH times in one graph and replayed."""
    return graph_per_call_us(fn, torch.device("cuda"), calls=CALLS_PER_GRAPH, replays=30)


def attention_case(sequences: int, context: int) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    kv_dim = KV_HEADS * HEAD_DIM
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = sequences * blocks_per_seq + 1
    cache = torch.randn(2, num_blocks * BLOCK, kv_dim, device=device, dtype=dtype)
    tables = torch.randperm(num_blocks - 1, device=device)[:sequences * blocks_per_seq].view(sequences, blocks_per_seq)
    lengths = torch.full((sequences,), context, device=device)
    qkv = torch.randn(sequences, HEADS * HEAD_DIM + 2 * kv_dim, device=device, dtype=dtype)
    query, key, value = qkv.split((HEADS * HEAD_DIM, kv_dim, kv_dim), dim=1)
    positions = lengths - 1
    slots = tables.gather(1, (positions // BLOCK)[:, None]).squeeze(1) * BLOCK + positions % BLOCK
    scale = 1 / math.sqrt(HEAD_DIM)
    with_tables = AttentionMetadata(slot_mapping=slots, num_decode_tokens=sequences, prefill_chunks=[], block_size=BLOCK,
                                    decode_block_tables=tables, decode_context_lens=lengths, decode_max_context=context)
    gather, mask = with_tables.decode_reads()  # built once per step, outside the layers, as the graph step does
    with_slots = AttentionMetadata(slot_mapping=slots, num_decode_tokens=sequences, prefill_chunks=[], block_size=BLOCK,
                                   decode_gather_slots=gather, decode_mask=mask)
    pytorch_us = per_call_us(lambda: paged_attention(query, key, value, cache, with_slots, HEADS, KV_HEADS, scale))
    triton_us = per_call_us(lambda: paged_attention(query, key, value, cache, with_tables, HEADS, KV_HEADS, scale))
    kv_bytes = 2 * sequences * context * kv_dim * cache.element_size()
    return {"sequences": sequences, "context": context, "pytorch_us": pytorch_us, "triton_us": triton_us,
            "speedup": pytorch_us / triton_us, "triton_kv_gb_per_s": kv_bytes / triton_us / 1e3,
            "splits": triton_attention.split_count(sequences, KV_HEADS, context)}


def norm_case(rows: int) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    hidden, delta = (torch.randn(rows, WIDTH, device=device, dtype=dtype) for _ in range(2))
    weight, bias = torch.randn(WIDTH, device=device, dtype=dtype), torch.randn(WIDTH, device=device, dtype=dtype)

    def pytorch():
        summed = hidden + delta
        return summed, F.layer_norm(summed, (WIDTH,), weight, bias, 1e-5)

    pytorch_us = per_call_us(pytorch)
    triton_us = per_call_us(lambda: triton_layer_norm.add_layer_norm(hidden, delta, weight, bias, 1e-5))
    return {"rows": rows, "pytorch_us": pytorch_us, "triton_us": triton_us, "speedup": pytorch_us / triton_us}


def gelu_case(rows: int, epilogue_ok: bool) -> dict:
    """c_fc + tanh GELU: the product then a separate GELU, against the GELU in the product's
    epilogue (cuBLASLt's, where it passed the load-time check; starchat's Triton kernel up to
    ROWS_PER_PASS rows, at its built-in blocks: the engine tunes them)."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    weight = torch.randn(INNER, WIDTH, device=device, dtype=dtype) / 64
    bias = torch.randn(INNER, device=device, dtype=dtype)
    x = torch.randn(rows, WIDTH, device=device, dtype=dtype)
    row = {"rows": rows, "separate_us": per_call_us(lambda: F.gelu(F.linear(x, weight, bias), approximate="tanh"))}
    if epilogue_ok:
        row["cublaslt_epilogue_us"] = per_call_us(lambda: cublas_linear_gelu(x, weight, bias))
    if triton_linear.supports(x):
        row["triton_epilogue_us"] = per_call_us(lambda: triton_linear.linear(x, weight, None, bias, gelu_tanh=True))
    row["weight_gb_per_s"] = {name: weight.numel() * weight.element_size() / us / 1e3
                              for name, us in row.items() if name.endswith("_us")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not triton_attention.supports(torch.device("cuda"), torch.bfloat16):
        sys.exit("gpu_kernels: needs a CUDA GPU of compute capability 8.0 or newer and Triton")
    results = {"machine": describe_machine(torch.device("cuda")), "attention": [], "add_layer_norm": []}
    print("decode attention, StarChat-beta layer (48 query heads, 1 KV head, head_dim 128, bf16), us per call")
    for sequences, context in ATTENTION_CASES:
        row = attention_case(sequences, context)
        results["attention"].append(row)
        print(f"  {sequences:4d} seqs x {context:5d} tokens: PyTorch {row['pytorch_us']:8.1f}  Triton {row['triton_us']:8.1f}"
              f"  x{row['speedup']:.2f}  ({row['triton_kv_gb_per_s']:.0f} GB/s of keys/values, {row['splits']} splits)",
              flush=True)
    print(f"residual add + LayerNorm, width {WIDTH}, bf16, us per call")
    for rows in NORM_ROWS:
        row = norm_case(rows)
        results["add_layer_norm"].append(row)
        print(f"  {rows:4d} rows: PyTorch {row['pytorch_us']:6.1f}  Triton {row['triton_us']:6.1f}  x{row['speedup']:.2f}",
              flush=True)
    epilogue_ok = check_gelu_epilogue(torch.device("cuda"), torch.bfloat16)
    results["cublaslt_gelu_epilogue_is_tanh"] = epilogue_ok
    results["up_projection_gelu"] = []
    print(f"MLP up projection ({INNER} x {WIDTH}) + tanh GELU, bf16, us per call; cuBLASLt epilogue "
          f"{'checked' if epilogue_ok else 'not the tanh GELU here: not used'}")
    for rows in GELU_ROWS:
        row = gelu_case(rows, epilogue_ok)
        results["up_projection_gelu"].append(row)
        print(f"  {rows:4d} rows: " + "  ".join(f"{name[:-3]} {us:8.1f}" for name, us in row.items() if name.endswith("_us")),
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
