/* What starchat's kernels share with each other (not a public interface: Python calls the
 * exported entry points through ctypes). */
#ifndef STARCHAT_KERNELS_H
#define STARCHAT_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "convert.h"
#include "vector_math.h"

/* Output.activation */
enum { ACTIVATION_NONE = 0, ACTIVATION_GELU_TANH = 1 };

/* Where a product's results go: row-major (m, n_total) in float32, float16 or bfloat16, each
 * times scales[n] (int8 weights) plus bias[n] when given, then the activation (in float32). */
typedef struct {
    void *data;
    int type;
    long n_total;
    const float *scales, *bias;
    long amx_min_rows; /* products of at least this many rows go to AMX tiles (amx.c) where granted; 0: never */
    int activation;    /* ACTIVATION_*: an MLP's up projection applies its GELU while its sums are in L1 */
} Output;

/* GELU, tanh approximation, one value (where no vector code applies): x / (1 + 2^z) as the vector
 * code (vector_math.h: gelu_tanh8), with the C library's exp2f. */
static inline float gelu_tanh(float x) {
    const float a = -2.0f * 0.7978845608028654f * 1.4426950408889634f, z = x * (a + a * 0.044715f * x * x);
    return x / (1.0f + exp2f(z < -126.0f ? -126.0f : z > 126.0f ? 126.0f : z));
}

/* The tanh GELU of 16 floats in place (a panel's row): the vector functions the separate GELU
 * pass (decode_step.c: gelu_rows) applies, so a fused product gives that pass's bits. */
static inline void gelu_tanh_16(float *values) {
#if defined(__AVX512F__) && defined(__FMA__)
    _mm512_storeu_ps(values, gelu_tanh16(_mm512_loadu_ps(values)));
#elif defined(__AVX2__) && defined(__FMA__)
    _mm256_storeu_ps(values, gelu_tanh8(_mm256_loadu_ps(values)));
    _mm256_storeu_ps(values + 8, gelu_tanh8(_mm256_loadu_ps(values + 8)));
#else
    for (int i = 0; i < 16; i++) values[i] = gelu_tanh(values[i]);
#endif
}

/* Inside a parallel region: this thread's scratch of `floats` floats, allocated by every thread;
 * after the barrier each knows whether any allocation failed (*failed), so all threads take the
 * same branch and meet the same work-sharing loops. Free with free(). */
static inline float *starchat_thread_scratch(long floats, int *failed) {
    float *scratch = (float *)malloc((size_t)floats * sizeof(float));
    if (!scratch) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    return scratch;
}

/* Output columns per weight panel (linear.c: weights are packed in panels of this many). */
#define PANEL 16

#if defined(__AVX2__) && defined(__F16C__)
/* Eight float32 values stored as `type` at out[at..]: the bits f32_to_bf16 / f32_to_f16 give (NaN: a NaN). */
static inline void store_eight_as(void *out, int type, long at, __m256 v) {
    if (type == W_F32) {
        _mm256_storeu_ps((float *)out + at, v);
        return;
    }
    __m128i halves;
    if (type == W_BF16) { /* nearest even; a NaN keeps its high half, made quiet (rounding could carry it into infinity) */
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256i bits = _mm256_castps_si256(v);
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)),
                                                                   _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1))), 16);
        const __m256i words = _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
        halves = _mm_packus_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    } else { /* nearest even, overflow to infinity, subnormals kept (a NaN stays a NaN, its payload's top bits kept) */
        halves = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)out + at), halves);
}
#endif

/* Rows row0 .. row0 + rows - 1 of the output, columns n0 .. n0 + columns - 1, from float32 sums
 * (tile[r][c]; scaled and biased in place: times the scale, then plus the bias, two roundings;
 * then the activation).
 * A full panel goes eight values a vector: per value, the output conversions had cost a third as
 * much as a 512-row bfloat16 product on AMX tiles (tiny_starcoder's c_fc, bfloat16 out). */
static inline void store_tile_rows(const Output *out, long row0, int rows, long n0, long columns, float (*tile)[PANEL]) {
#if defined(__AVX2__) && defined(__F16C__)
    if (columns == PANEL) {
        const __m256 scale_low = out->scales ? _mm256_loadu_ps(out->scales + n0) : _mm256_set1_ps(1.0f);
        const __m256 scale_high = out->scales ? _mm256_loadu_ps(out->scales + n0 + 8) : _mm256_set1_ps(1.0f);
        const __m256 bias_low = out->bias ? _mm256_loadu_ps(out->bias + n0) : _mm256_setzero_ps();
        const __m256 bias_high = out->bias ? _mm256_loadu_ps(out->bias + n0 + 8) : _mm256_setzero_ps();
        for (int r = 0; r < rows; r++) {
            __m256 low = _mm256_loadu_ps(tile[r]), high = _mm256_loadu_ps(tile[r] + 8);
            if (out->scales) {
                low = _mm256_mul_ps(low, scale_low);
                high = _mm256_mul_ps(high, scale_high);
            }
            if (out->bias) { /* x + 0 would turn -0 into +0 */
                low = _mm256_add_ps(low, bias_low);
                high = _mm256_add_ps(high, bias_high);
            }
            if (out->activation == ACTIVATION_GELU_TANH) {
#if defined(__FMA__)
                low = gelu_tanh8(low), high = gelu_tanh8(high);
#else
                _mm256_storeu_ps(tile[r], low), _mm256_storeu_ps(tile[r] + 8, high);
                gelu_tanh_16(tile[r]);
                low = _mm256_loadu_ps(tile[r]), high = _mm256_loadu_ps(tile[r] + 8);
#endif
            }
            const long at = (row0 + r) * out->n_total + n0;
            store_eight_as(out->data, out->type, at, low);
            store_eight_as(out->data, out->type, at + 8, high);
        }
        return;
    }
#endif
    for (int r = 0; r < rows; r++) {
        float *values = tile[r];
        if (out->scales)
            for (long c = 0; c < columns; c++) values[c] *= out->scales[n0 + c];
        if (out->bias)
            for (long c = 0; c < columns; c++) values[c] += out->bias[n0 + c];
        if (out->activation == ACTIVATION_GELU_TANH) gelu_tanh_16(values); /* the row has PANEL floats */
        long at = (row0 + r) * out->n_total + n0;
        if (out->type == W_F32)
            memcpy((float *)out->data + at, values, (size_t)columns * sizeof(float));
        else
            for (long c = 0; c < columns; c++) store_as(out->data, out->type, at + c, values[c]);
    }
}

/* Orphaned work-sharing loops: inside a parallel region the threads split the work. w is packed. */
void starchat_linear_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k);
/* The same product on AMX tiles (amx.c), for bfloat16, int8 and float16 weights: 1 when done, 0 (on
 * every thread) when AMX is not available here or the weights are float32. */
int starchat_amx_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k);
/* The most rows whose product with int8 weights of K columns runs on AMX-INT8 tiles (amx.c: the
 * activations quantized per row to 15 bits); 0 where there are none. More rows take bfloat16 tiles. */
long starchat_amx_int8_max_rows(long k);
/* One sequence's attention for `heads` (at most 16) query heads of one KV head over a bfloat16 or
 * float16 cache (`type`), on AMX tiles (amx.c): q (heads x head_dim) and out float32, keys/values
 * rows kv_dim apart, this head's columns from `offset`; 1 when done, 0 when AMX is not available
 * or the shape does not fit (head_dim a multiple of 32, at most 256). stats (not NULL): out left
 * unnormalised, each head's maximum score and sum of weights in stats[2h], stats[2h + 1]. scratch:
 * starchat_amx_attention_scratch(max_len, head_dim) floats. */
int starchat_amx_attention(const float *q, int heads, const uint16_t *keys, const uint16_t *values, int type, long kv_dim,
                           long offset, const int64_t *slots, const float *mask, long max_len, int head_dim, float scale,
                           float *out, float *stats, float *scratch);
long starchat_amx_attention_scratch(long max_len, int head_dim);
/* Whether AMX tiles are granted here and not taken back (amx.c). */
int starchat_amx_ready(void);
/* Decode attention's items inside a parallel region (decode_attention.c), shared among its threads
 * by work. query and out are of io_type, the cache of type; slots and mask (batch, max_len);
 * lengths (batch,): each row's positions up to its last unmasked one (starchat_attention_lengths),
 * so that a row's work ends there and not at the batch's longest context. A long row's keys go
 * in parts, merged after: partials holds starchat_attention_partials(...) floats shared by the
 * team, scratch starchat_attention_scratch(...) floats of the calling thread's own. */
void starchat_attention_items(const void *query, int io_type, const void *keys, const void *values, int type, const int64_t *slots,
                              const float *mask, const int64_t *lengths, long batch, long max_len, int heads, int kv_heads,
                              int head_dim, float scale, void *out, float *partials, float *scratch);
/* lengths[b]: 1 + the last position of mask row b (batch rows of max_len) that is not -inf; 1 for a
 * row masked throughout (its zeros come from the usual path). */
void starchat_attention_lengths(const float *mask, long batch, long max_len, int64_t *lengths);
/* Floats of the shared partial sums starchat_attention_items needs for these rows' lengths. */
long starchat_attention_partials(const int64_t *lengths, long batch, long max_len, int heads, int head_dim);
/* Floats of per-thread scratch starchat_attention_items needs. */
long starchat_attention_scratch(long max_len, int heads, int kv_heads, int head_dim);

#endif
