"""Native CPU kernels: matrix products over weights packed at load time (linear.c, amx.c), decode attention
(decode_attention.c), prompt attention on AMX tiles (prompt_attention.c) and whole decode steps (decode_step.c)."""

from __future__ import annotations

import torch

from starchat.model.native.build import load

WEIGHT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
ACTIVATION_NONE, ACTIVATION_GELU_TANH = 0, 1  # a product's activation (kernels.h)
PANEL = 16  # output columns per packed panel (PANEL in kernels.h)


def available() -> bool:
    return load() is not None


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """The shape pack_weight gives an (out_features, in_features) weight."""
    return -(-out_features // PANEL), in_features, PANEL


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight (N, K) in the layout the products read: panels of PANEL output columns,
    (ceil(N / PANEL), K, PANEL), same dtype, the last panel zero-padded (see linear.c)."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padding = panels * PANEL - out_features
    if padding:
        weight = torch.cat([weight, weight.new_zeros(padding, in_features)])
    return weight.reshape(panels, PANEL, in_features).transpose(1, 2).contiguous()


def pack_weight_in_place(weight: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """`pack_weight(weight)` in weight's own storage (N a multiple of PANEL, contiguous): no second
    copy of the model's matrices while loading. `weight` itself is scrambled: use only the returned
    view. Panels go through `scratch` (a uint8 tensor, reused across calls; 16 MiB by default) a
    few at a time: allocations of a different size per layer fragmented the heap and cost more
    memory than they held."""
    out_features, in_features = weight.shape
    if out_features % PANEL or not weight.is_contiguous():
        raise ValueError(f"pack_weight_in_place: needs a contiguous weight with a multiple of {PANEL} rows, not {tuple(weight.shape)}")
    panels, panel_bytes = out_features // PANEL, PANEL * in_features * weight.element_size()
    if scratch is None or scratch.numel() < panel_bytes:
        scratch = torch.empty(max(panel_bytes, 16 << 20), dtype=torch.uint8)
    step = scratch.numel() // panel_bytes
    blocks = weight.view(panels, PANEL, in_features)
    for start in range(0, panels, step):
        count = min(step, panels - start)
        staged = scratch[:count * panel_bytes].view(weight.dtype).view(count, in_features, PANEL)
        staged.copy_(blocks[start:start + count].transpose(1, 2))  # out of the rows before they are overwritten
        blocks[start:start + count].view(count, in_features, PANEL).copy_(staged)
    return weight.view(panels, in_features, PANEL)


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the (N, K) weight that `packed` holds: an embedding lookup in a table that
    is also a packed lm_head (tied weights are stored once)."""
    return packed[rows // PANEL, :, rows % PANEL]


def unpack_bf16(packed: torch.Tensor, out_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out_features, K) weight that bfloat16 or int8 `packed` holds, as bfloat16 (int8 values
    are exact; scales not applied), into `out` where given: an AMX product's weight, unpacked per
    call. Requires `available()`."""
    weight_type = WEIGHT_TYPES.get(packed.dtype)
    if weight_type not in (2, 3) or packed.dim() != 3 or packed.shape[2] != PANEL or not packed.is_contiguous() \
            or not 0 <= packed.shape[0] * PANEL - out_features < PANEL:
        raise ValueError(f"native unpack: needs a packed bfloat16 or int8 weight of {out_features} outputs, "
                         f"not {tuple(packed.shape)} {packed.dtype}")
    if out is None:
        out = torch.empty(out_features, packed.shape[1], dtype=torch.bfloat16)
    elif out.shape != (out_features, packed.shape[1]) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"native unpack: out must be a contiguous bfloat16 tensor of {(out_features, packed.shape[1])}")
    load().starchat_unpack_bf16(packed.data_ptr(), weight_type, out_features, packed.shape[1], out.data_ptr(),
                                torch.get_num_threads())
    return out


def amx_init() -> bool:
    """Whether the native products (and decode attention over 16-bit caches) may use AMX tiles
    (amx.c): built with AMX-BF16 and granted the tile state by the kernel; from then on they do.
    Requires `available()`."""
    return bool(load().starchat_amx_init())


def amx_int8_max_rows(in_features: int) -> int:
    """The most rows whose product with int8 weights of `in_features` columns runs on AMX-INT8 tiles
    (activations quantized per row to 15 bits, amx.c); 0 without them (or before `amx_init()`)."""
    return int(load().starchat_amx_int8_max_rows(in_features))


def int8_rows_quantized() -> bool:
    """Whether int8 products of more than one row quantize the activation rows to 15 bits (AVX512-VNNI
    byte dot products, linear.c; AMX-INT8 tiles quantize them too, `amx_int8_max_rows`) instead of
    multiplying float32 rows. Requires `available()`."""
    return bool(load().starchat_linear_int8_rows_quantized())


def amx_disable() -> None:
    """No AMX tiles in the native library from now on (until `amx_init()` again)."""
    load().starchat_amx_disable()


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           scales: torch.Tensor | None = None, amx_min_rows: int = 0, out: torch.Tensor | None = None,
           gelu_tanh: bool = False) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T (* scales (N,)) (+ bias (N,)), in x's dtype (float32, float16
    or bfloat16; the arithmetic is float32), for `packed = pack_weight(weight)` and N = out_features;
    with `gelu_tanh`, then the tanh GELU of `gelu_` (its bits), applied to each panel's float32
    results while they are in L1, before any rounding to x's dtype.
    From `amx_min_rows` rows (0: never; after `amx_init()`), bfloat16 weights multiply on AMX
    tiles, the activations rounded to bfloat16; int8 weights on AMX-INT8 tiles against activations
    quantized per row to 15 bits (up to `amx_int8_max_rows(K)` rows; more on bfloat16 tiles like
    bfloat16 weights); float16 weights as two exact bfloat16 halves against activations kept to 16
    bits of significand (amx.c). Other int8 products of 2+ rows quantize the rows the same way
    where the CPU has AVX512-VNNI (`int8_rows_quantized()`).

    The weight is float32, float16, bfloat16 or int8 (then `scales` is required); bias and scales
    are float32. Requires `available()`.
    """
    in_features = x.shape[-1]
    weight_type = WEIGHT_TYPES.get(packed.dtype)
    # Cheap checks only: this runs for every layer of every step.
    if (weight_type is None or packed.dim() != 3 or packed.shape[1:] != (in_features, PANEL) or not packed.is_contiguous()
            or not 0 <= packed.shape[0] * PANEL - out_features < PANEL):
        raise ValueError(f"native linear: unsupported packed weight {tuple(packed.shape)} {packed.dtype} for input "
                         f"{tuple(x.shape)} and {out_features} outputs (pack it with pack_weight)")
    if (weight_type == 3) != (scales is not None):
        raise ValueError("native linear: int8 weights need scales, other weights take none")
    for name, vector in (("bias", bias), ("scales", scales)):
        if vector is not None and (vector.dtype != torch.float32 or vector.numel() != out_features or not vector.is_contiguous()):
            raise ValueError(f"native linear: {name} must be a contiguous float32 vector of {out_features}")
    activation_type = WEIGHT_TYPES.get(x.dtype, 3)
    if activation_type == 3:
        raise ValueError(f"native linear: activations must be float32, float16 or bfloat16, not {x.dtype}")
    rows = x.contiguous()
    shape = (*x.shape[:-1], out_features)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"native linear: out must be a contiguous {x.dtype} tensor of {shape}, not {out.dtype} {tuple(out.shape)}")
    status = load().starchat_linear(
        rows.data_ptr(), activation_type, rows.numel() // in_features, packed.data_ptr(), weight_type,
        scales.data_ptr() if scales is not None else None, bias.data_ptr() if bias is not None else None,
        out.data_ptr(), activation_type, out_features, in_features, torch.get_num_threads(), amx_min_rows,
        ACTIVATION_GELU_TANH if gelu_tanh else ACTIVATION_NONE,
    )
    if status:
        raise MemoryError(f"native linear: out of memory for {rows.numel()} activations") if status == -2 else \
            RuntimeError(f"native linear failed with status {status}")
    return out


NONFINITE_WEIGHT = "holds NaN or infinite values, which int8 with a scale per row cannot represent; the checkpoint is damaged"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K), float32 scales (N,)) of a contiguous float32, float16 or bfloat16 CPU weight
    (N, K): the same bits as quant.quantize_per_channel's PyTorch expression, in one pass over each
    row; ValueError for a weight with NaN or infinite values. Requires `available()`."""
    weight_type = WEIGHT_TYPES.get(weight.dtype)
    if weight.dim() != 2 or weight_type not in (0, 1, 2) or not weight.is_contiguous() or weight.device.type != "cpu":
        raise ValueError(f"native quantize: needs a contiguous 2-D float CPU weight, got {weight.dtype} {tuple(weight.shape)} "
                         f"on {weight.device}")
    rows, columns = weight.shape
    quantized = torch.empty((rows, columns), dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    status = load().starchat_quantize_rows(weight.data_ptr(), weight_type, rows, columns, quantized.data_ptr(),
                                           scales.data_ptr(), torch.get_num_threads())
    if status == -3:
        raise ValueError(NONFINITE_WEIGHT)
    if status:
        raise MemoryError("native quantize: out of memory") if status == -2 else RuntimeError(f"native quantize failed ({status})")
    return quantized, scales


def gelu_(x: torch.Tensor, tanh_approximation: bool) -> torch.Tensor:
    """x = gelu(x) in place (tanh approximation or exact), for a contiguous float32 CPU tensor: the
    arithmetic of the decode step's GELU (vectorised tanh: PyTorch's float32 GELU took 1.5 ms for
    512 x 3,072 values on a 2-core Xeon). Requires `available()`."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"native gelu: needs a contiguous float32 CPU tensor, got {x.dtype} on {x.device}")
    load().starchat_gelu(x.data_ptr(), x.numel(), int(tanh_approximation), torch.get_num_threads())
    return x


def add_layer_norm_applies(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                           bias: torch.Tensor | None) -> bool:
    """Whether `add_layer_norm_` takes these: contiguous float32 CPU rows (T, C) outside autograd, a
    delta of their shape, a weight and bias of C, with the kernels built (a packed model's prompt
    chunks from the first layer's second norm on, or the first too where the embeddings are float32)."""
    return (hidden.device.type == "cpu" and hidden.dtype == torch.float32 and hidden.dim() == 2 and hidden.is_contiguous()
            and weight is not None and bias is not None and weight.dtype == bias.dtype == torch.float32
            and weight.shape == bias.shape == hidden.shape[1:] and weight.is_contiguous() and bias.is_contiguous()
            and (delta is None or (delta.dtype == torch.float32 and delta.is_contiguous() and delta.shape == hidden.shape))
            and not hidden.requires_grad and not (delta is not None and delta.requires_grad) and available())


def try_add_layer_norm_(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`add_layer_norm_` where `add_layer_norm_applies`, else None (nothing done): the model's
    per-layer call, which checks its arguments once."""
    return _add_layer_norm(hidden, delta, weight, bias, eps) if add_layer_norm_applies(hidden, delta, weight, bias) else None


def add_layer_norm_(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, layer_norm(hidden + delta)) for float32 CPU rows (T, C), the sum written into
    `hidden` (delta None: nothing added): the decode step's add and layer norm (means and
    variances summed in double), one pass over each row. Requires `available()`."""
    tensors = (hidden, weight, bias) if delta is None else (hidden, delta, weight, bias)
    if hidden.dim() != 2 or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors) \
            or (delta is not None and delta.shape != hidden.shape) or weight.shape != hidden.shape[1:] \
            or bias.shape != hidden.shape[1:]:
        raise ValueError("native add_layer_norm: needs contiguous float32 CPU rows (T, C), a delta of their shape "
                         "and a weight and bias of C")
    return _add_layer_norm(hidden, delta, weight, bias, eps)


def _add_layer_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    normed = torch.empty_like(hidden)
    load().starchat_add_layer_norm(hidden.data_ptr(), delta.data_ptr() if delta is not None else None, hidden.shape[0],
                                   hidden.shape[1], weight.data_ptr(), bias.data_ptr(), eps, normed.data_ptr(),
                                   torch.get_num_threads())
    return hidden, normed


CACHE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def write_cache_applies(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> bool:
    """Whether `write_cache` takes these: float32 CPU rows with unit column stride and one row stride,
    a contiguous CPU layer cache of a CACHE_TYPES dtype, int64 slots; the kernels built."""
    return (key.device.type == "cpu" and key.dtype == value.dtype == torch.float32 and key.dim() == 2
            and key.stride(1) == value.stride(1) == 1 and key.stride(0) == value.stride(0) and key.shape == value.shape
            and layer_cache.device.type == "cpu" and layer_cache.dtype in CACHE_TYPES and layer_cache.is_contiguous()
            and layer_cache.dim() == 3 and layer_cache.shape[2] == key.shape[1]
            and slots.dtype == torch.int64 and slots.is_contiguous() and slots.numel() == key.shape[0] and available())


def try_write_cache(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> bool:
    """`write_cache` where `write_cache_applies` (True), else False (nothing written): the model's
    per-layer call, which checks its arguments once."""
    if not write_cache_applies(layer_cache, key, value, slots):
        return False
    status = load().starchat_write_cache(key.data_ptr(), value.data_ptr(), key.stride(0), key.shape[0], key.shape[1],
                                         slots.data_ptr(), layer_cache[0].data_ptr(), layer_cache[1].data_ptr(),
                                         layer_cache.shape[1], CACHE_TYPES[layer_cache.dtype], torch.get_num_threads())
    if status == -2:
        raise IndexError(f"native write_cache: a slot outside the cache's {layer_cache.shape[1]} rows")
    return True


def write_cache(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """layer_cache[0][slots[r]] = key[r] and layer_cache[1][slots[r]] = value[r], rounded to the
    cache's dtype (nearest even, as PyTorch's conversion), for `write_cache_applies` arguments;
    IndexError (nothing written) for a slot outside the cache. Requires `available()`."""
    if not try_write_cache(layer_cache, key, value, slots):
        raise ValueError("native write_cache: needs float32 rows with unit column stride, a contiguous 16/32-bit "
                         "(2, slots, width) cache and int64 slots, one per row")


def decode_attention(query: torch.Tensor, layer_cache: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                     num_heads: int, num_kv_heads: int, scale: float, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence attending to its cached tokens (see decode_attention.c).

    query (B, H*D) and layer_cache (2, num_slots, KVH*D) are float32, float16 or bfloat16 (not
    necessarily the same); slots (B, L) int64 cache rows; mask (B, L) or (B, 1, 1, L) float32, 0 to
    keep and -inf for padding. lengths (B,): each row's keys, where its mask is -inf from there on
    (the engine knows them); None: found in the mask (a scan of each row's masked tail). Returns
    (B, H*D) in the query's dtype. Requires `available()`.
    """
    query_type, cache_type = CACHE_TYPES.get(query.dtype), CACHE_TYPES.get(layer_cache.dtype)
    batch, max_len = slots.shape
    head_dim = query.shape[1] // num_heads
    if query_type is None or cache_type is None or not layer_cache[0].is_contiguous():
        raise ValueError(f"native decode attention: query {query.dtype} and cache {layer_cache.dtype} must be 16/32-bit floats")
    if slots.dtype != torch.int64 or mask.dtype != torch.float32 or mask.numel() != batch * max_len:
        raise ValueError("native decode attention: slots must be int64 (B, L) and mask float32 with B * L elements")
    query, slots, mask = query.contiguous(), slots.contiguous(), mask.contiguous()
    if lengths is not None:
        lengths = lengths.to(torch.int64).contiguous()
        if lengths.shape != (batch,):
            raise ValueError(f"native decode attention: lengths must have shape ({batch},), not {tuple(lengths.shape)}")
    out = torch.empty_like(query)
    status = load().starchat_decode_attention(
        query.data_ptr(), query_type, layer_cache[0].data_ptr(), layer_cache[1].data_ptr(), cache_type, slots.data_ptr(),
        mask.data_ptr(), None if lengths is None else lengths.data_ptr(), batch, max_len, num_heads, num_kv_heads,
        head_dim, scale, out.data_ptr(), torch.get_num_threads(),
    )
    if status:
        raise MemoryError("native decode attention: out of memory") if status == -2 else \
            ValueError(f"native decode attention: bad shapes (heads {num_heads}, kv heads {num_kv_heads}, head dim {head_dim})")
    return out


def prompt_attention(query: torch.Tensor, out: torch.Tensor, chunks: list[tuple], num_heads: int, num_kv_heads: int,
                     scale: float, split: bool) -> bool:
    """Causal attention of every prompt chunk in one call on AMX tiles (prompt_attention.c), written
    into rows of `out`; False (nothing written) where that kernel cannot run here: no AMX tiles,
    or a head size not a multiple of 32.

    query (T, H*D) float32 with unit column stride (a view of the fused projection will do); out
    (T, H*D) float32, contiguous. Each chunk is (first_row, length, context_len, keys, values,
    slots): its `length` query rows from `first_row` attend causally to context_len + length
    keys, key i being keys[i] (slots None: 2-D rows, float32 or 16-bit, unit column stride, keys
    and values with the same row stride) or keys[slots[i]] (a layer cache's keys and values,
    slots int64). `split` False: queries, keys, values and softmax weights rounded to bfloat16;
    True: each kept to 16 bits of significand as two bfloat16 halves (three tile products).
    """
    library = load()
    if not library.starchat_amx_ready() or not chunks:
        return False
    head_dim = query.shape[1] // num_heads
    if query.dtype != torch.float32 or query.stride(1) != 1 or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.shape != query.shape:
        raise ValueError(f"native prompt attention: needs float32 queries (unit column stride) and a contiguous float32 "
                         f"output of their shape, not {query.dtype} {tuple(query.shape)} and {out.dtype} {tuple(out.shape)}")
    descriptors = []
    for first_row, length, context_len, keys, values, slots in chunks:
        kv_type = CACHE_TYPES.get(keys.dtype)
        if kv_type is None or values.dtype != keys.dtype or keys.stride() != values.stride() or keys.stride(-1) != 1 \
                or keys.shape[-1] != num_kv_heads * head_dim:
            raise ValueError(f"native prompt attention: keys {keys.dtype} {tuple(keys.shape)} and values "
                             f"{values.dtype} {tuple(values.shape)} must be 16/32-bit float rows of {num_kv_heads * head_dim}, "
                             "with the same strides")
        if slots is not None and (slots.dtype != torch.int64 or not slots.is_contiguous()
                                  or slots.numel() != context_len + length):
            raise ValueError(f"native prompt attention: slots must be {context_len + length} contiguous int64 row numbers")
        if first_row < 0 or length < 1 or context_len < 0 or first_row + length > query.shape[0]:
            raise ValueError(f"native prompt attention: rows {first_row} .. {first_row + length - 1} (context "
                             f"{context_len}) outside the {query.shape[0]} queries")
        if slots is None and keys.shape[0] < context_len + length:
            raise ValueError(f"native prompt attention: {context_len + length} keys needed, {keys.shape[0]} given")
        descriptors.append((first_row, length, context_len, keys.data_ptr(), values.data_ptr(), kv_type, keys.stride(0),
                            slots.data_ptr() if slots is not None else 0))
    table = torch.tensor(descriptors, dtype=torch.int64)
    status = library.starchat_prompt_attention(
        query.data_ptr(), query.stride(0), table.data_ptr(), len(descriptors), num_heads, num_kv_heads, head_dim, scale,
        int(split), out.data_ptr(), out.stride(0), torch.get_num_threads())
    if status < 0:
        raise MemoryError("native prompt attention: out of memory")
    return status == 0
