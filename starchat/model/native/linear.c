/* starchat's CPU matrix products: Y[m, n] = sum_k X[m, k] * W[n, k] (* scale[n]) (+ bias[n]).
 *
 * Weights are packed once, when the model is loaded (native/__init__.py: pack_weight), into
 * panels of PANEL output columns: panel b holds W[PANEL * b + c, j] at (j, c), row-major (k,
 * PANEL), in the weight's own type (float32, float16, bfloat16, or int8 with a float32 scale per
 * output column); the last panel is zero-padded. One layout serves every row count:
 *
 * - Each panel is one sequential stream, so decoding a single sequence (memory-bound: every
 *   weight is read once per token) streams the weights in memory order with a software prefetch.
 * - A tile of up to TILE_ROWS activation rows times one panel is an outer product: per k, two
 *   8-wide panel loads and one broadcast per row feed 2 * TILE_ROWS FMAs, the 12 accumulators in
 *   registers (with AVX-512: one 16-wide load feeds TILE_ROWS = 12 FMAs, and past 12 rows two
 *   panels go together in tiles of 6 rows; the same per-element sums in the same order, so the
 *   same results; one row, bound by memory, keeps the 8-wide code). The panel is read from cache by every further tile of rows, so many rows (prefill,
 *   large decode batches) are compute-bound. Packing at load time removes the per-call transposes
 *   that capped the kernel at about half this speed.
 * - With more than TILE_ROWS rows, 16-bit and int8 panels are widened to float32 once per panel
 *   and block of rows (per thread, in cache) instead of in every tile.
 *
 * X and Y are float32, float16 or bfloat16 (the arithmetic is float32). Compiled on the user's
 * machine with -march=native (see build.py): AVX2 + FMA + F16C (and AVX-512F for the many-row
 * tiles) where the CPU has them, a portable
 * loop (vectorised by the compiler) elsewhere. Threads: OpenMP, the same runtime PyTorch loads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int8_rows.h"
#include "kernels.h"

#define STARCHAT_LINEAR_ABI 6  /* 6: starchat_linear takes an activation; starchat_add_layer_norm */

int starchat_linear_abi(void) { return STARCHAT_LINEAR_ABI; }

/* Activation rows per register tile: with AVX-512 a panel row is one 16-wide register, so a
 * tile of 12 rows keeps 12 independent accumulators (enough to cover the FMA latency on both
 * ports); with AVX2 it is two 8-wide halves, 6 rows x 2 = 12 accumulators. */
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TILE_ROWS 12
#define HAVE_AVX512 1
#else
#define TILE_ROWS 6
#define HAVE_AVX512 0
#endif
/* Rows per pass over the weights: the activation block a thread re-reads for every panel stays
 * in its L2 cache (or L3 for the widest layers), and each weight panel is read from memory once
 * per block. */
#define ROW_BLOCK 144
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024 /* how far ahead of the panel stream the software prefetch reads */
#endif
/* Independent accumulator pairs of the one-row product: with one pair every step waits for the
 * previous FMA (4-5 cycles), which capped int8 panels (16 bytes a step) below the memory
 * bandwidth; four pairs measured 1.2x on int8 and 1.0-1.06x on 16-bit weights. */
#define ONE_ROW_CHAINS 4
#ifndef INT8_EXTRA_AHEAD
/* Int8 one-row products (16 weights a 16-byte row, more instructions per byte than 16-bit rows)
 * prefetch this much further ahead: 3 KiB in all measured 1.06-1.08x over 1 KiB on the Xeon's
 * 16-wide product, 1.1-1.16x on its AVX2 build's 8-wide one. */
#define INT8_EXTRA_AHEAD 2048
#endif

/* The product of up to TILE_ROWS activation rows (float32, row stride ldx) and one panel. */
typedef float Tile[TILE_ROWS][PANEL];

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1

/* Panel row j (PANEL weights of `wtype`) as two float32 vectors. Each half is widened straight
 * from memory (the conversions take a memory operand), not split out of one wide load: a shuffle
 * less per row, which counts for int8's 16-byte rows. */
static inline __attribute__((always_inline)) void load_panel_row(const void *panel, int wtype, long j, __m256 *low,
                                                                   __m256 *high) {
    switch (wtype) {
    case W_F16: {
        const __m128i *row = (const __m128i *)((const uint16_t *)panel + j * PANEL);
        *low = _mm256_cvtph_ps(_mm_loadu_si128(row));
        *high = _mm256_cvtph_ps(_mm_loadu_si128(row + 1));
        break;
    }
    case W_BF16: {
        const __m128i *row = (const __m128i *)((const uint16_t *)panel + j * PANEL);
        *low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(row)), 16));
        *high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(row + 1)), 16));
        break;
    }
    case W_I8: {
        const int8_t *row = (const int8_t *)panel + j * PANEL;
        *low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)row)));
        *high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8))));
        break;
    }
    default:
        *low = _mm256_loadu_ps((const float *)panel + j * PANEL);
        *high = _mm256_loadu_ps((const float *)panel + j * PANEL + 8);
    }
}

/* A bfloat16 panel row as float32 without widening shuffles: one load, the even columns (low
 * halves of each 32-bit pair) shifted up, the odd ones masked, so `even` holds columns 0, 2, ...,
 * 14 and `odd` 1, 3, ..., 15. For the one-row product, whose stream of two shuffles and two
 * shifts per row kept bfloat16 at about 80% of float16's rate where both are bound by memory. */
static inline __attribute__((always_inline)) void load_bf16_row_even_odd(const void *panel, long j, __m256 *even,
                                                                            __m256 *odd) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + j * PANEL));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000u)));
}

/* tile[r][c] = sum_j x[r * ldx + j] * panel(j, c) for r < ROWS. Inlined with constant ROWS and
 * wtype, so the accumulators live in registers and the type switch folds away. The k loop is
 * unrolled four times by the compiler (measured: 1.6x the plain loop's FLOP/s, which spent its
 * issue slots on loop overhead; unrolling by hand instead made GCC hoist the broadcasts and spill
 * accumulators) and prefetches the panel stream PREFETCH_BYTES ahead, once per cache line. */
/* tile[0] = x . panel for one activation row (decoding one sequence: memory-bound), over
 * ONE_ROW_CHAINS accumulator pairs; prefetches the panel stream like tile_product. */
static inline __attribute__((always_inline)) void one_row_product(const float *x, const void *panel, int wtype, long k,
                                                                    Tile tile, const char *ahead) {
    __m256 low[ONE_ROW_CHAINS], high[ONE_ROW_CHAINS], w0, w1;
    for (int u = 0; u < ONE_ROW_CHAINS; u++) low[u] = high[u] = _mm256_setzero_ps();
    const long row_bytes = PANEL * element_size(wtype), steps_per_line = 64 / row_bytes;
    long j = 0;
    for (; j + ONE_ROW_CHAINS <= k; j += ONE_ROW_CHAINS) {
        for (int u = 0; u < ONE_ROW_CHAINS; u++) {
            if ((j + u) % steps_per_line == 0)
                _mm_prefetch(ahead + (wtype == W_I8 ? INT8_EXTRA_AHEAD : 0) + (j + u) * row_bytes, _MM_HINT_T0);
            if (wtype == W_BF16)
                load_bf16_row_even_odd(panel, j + u, &w0, &w1);
            else
                load_panel_row(panel, wtype, j + u, &w0, &w1);
            __m256 xv = _mm256_broadcast_ss(x + j + u);
            low[u] = _mm256_fmadd_ps(w0, xv, low[u]);
            high[u] = _mm256_fmadd_ps(w1, xv, high[u]);
        }
    }
    for (; j < k; j++) {
        if (wtype == W_BF16)
            load_bf16_row_even_odd(panel, j, &w0, &w1);
        else
            load_panel_row(panel, wtype, j, &w0, &w1);
        __m256 xv = _mm256_broadcast_ss(x + j);
        low[0] = _mm256_fmadd_ps(w0, xv, low[0]);
        high[0] = _mm256_fmadd_ps(w1, xv, high[0]);
    }
    for (int u = 1; u < ONE_ROW_CHAINS; u++) {
        low[0] = _mm256_add_ps(low[0], low[u]);
        high[0] = _mm256_add_ps(high[0], high[u]);
    }
    if (wtype == W_BF16) { /* back to column order: low holds columns 0, 2, ..., 14, high 1, 3, ..., 15 */
        const __m256 first = _mm256_unpacklo_ps(low[0], high[0]), second = _mm256_unpackhi_ps(low[0], high[0]);
        low[0] = _mm256_permute2f128_ps(first, second, 0x20);
        high[0] = _mm256_permute2f128_ps(first, second, 0x31);
    }
    _mm256_storeu_ps(tile[0], low[0]);
    _mm256_storeu_ps(tile[0] + 8, high[0]);
}

#if HAVE_AVX512
/* Panel row j as one float32 vector of 16. */
static inline __attribute__((always_inline)) __m512 load_panel_row_512(const void *panel, int wtype, long j) {
    switch (wtype) {
    case W_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + j * PANEL)));
    case W_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + j * PANEL))), 16));
    case W_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)panel + j * PANEL))));
    default:
        return _mm512_loadu_ps((const float *)panel + j * PANEL);
    }
}

/* one_row_product with 16-wide accumulators, for int8 panels: with 8-wide halves each 16-byte
 * row took two sign-extending shuffles, two conversions and two FMAs, which held int8 at about
 * 17 GB/s where 16-bit rows stream at 23 (a 2-core Xeon, 400 MiB of weights); one of each per
 * row here: 20 GB/s, and int8 batch-1 decoding of tiny_starcoder 160-182 against 125-130
 * tokens/s. (16-bit rows gained nothing from 16-wide accumulators: bound by memory already.)
 * The same chains over k, added in the same order: the same bits as the 8-wide product. */
static inline __attribute__((always_inline)) void one_row_product_512(const float *x, const void *panel, int wtype,
                                                                        long k, Tile tile, const char *ahead) {
    __m512 acc[ONE_ROW_CHAINS];
    for (int u = 0; u < ONE_ROW_CHAINS; u++) acc[u] = _mm512_setzero_ps();
    const long row_bytes = PANEL * element_size(wtype), steps_per_line = 64 / row_bytes;
    long j = 0;
    for (; j + ONE_ROW_CHAINS <= k; j += ONE_ROW_CHAINS) {
        for (int u = 0; u < ONE_ROW_CHAINS; u++) {
            if ((j + u) % steps_per_line == 0) _mm_prefetch(ahead + INT8_EXTRA_AHEAD + (j + u) * row_bytes, _MM_HINT_T0);
            acc[u] = _mm512_fmadd_ps(load_panel_row_512(panel, wtype, j + u), _mm512_set1_ps(x[j + u]), acc[u]);
        }
    }
    for (; j < k; j++) acc[0] = _mm512_fmadd_ps(load_panel_row_512(panel, wtype, j), _mm512_set1_ps(x[j]), acc[0]);
    for (int u = 1; u < ONE_ROW_CHAINS; u++) acc[0] = _mm512_add_ps(acc[0], acc[u]);
    _mm512_storeu_ps(tile[0], acc[0]);
}

#define PAIR_ROWS 6
/* Two panels at once (32 output columns): per k, two 16-wide loads and one broadcast per row feed
 * 2 * ROWS FMAs, 12 accumulators at 6 rows, so loads no longer outnumber FMAs. The same
 * per-element sums in the same order as the other tiles. */
static inline __attribute__((always_inline)) void pair_product(const float *x, long ldx, const void *panel_a,
                                                                 const void *panel_b, int wtype, long k, int ROWS,
                                                                 Tile tile_a, Tile tile_b, const char *ahead) {
    __m512 acc_a[PAIR_ROWS], acc_b[PAIR_ROWS];
    for (int r = 0; r < ROWS; r++) acc_a[r] = acc_b[r] = _mm512_setzero_ps();
    const long row_bytes = PANEL * element_size(wtype), steps_per_line = 64 / row_bytes;
#pragma GCC unroll 4
    for (long j = 0; j < k; j++) {
        if (j % steps_per_line == 0) _mm_prefetch(ahead + j * row_bytes, _MM_HINT_T0);
        const __m512 wa = load_panel_row_512(panel_a, wtype, j), wb = load_panel_row_512(panel_b, wtype, j);
        for (int r = 0; r < ROWS; r++) {
            const __m512 xv = _mm512_set1_ps(x[r * ldx + j]);
            acc_a[r] = _mm512_fmadd_ps(wa, xv, acc_a[r]);
            acc_b[r] = _mm512_fmadd_ps(wb, xv, acc_b[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(tile_a[r], acc_a[r]);
        _mm512_storeu_ps(tile_b[r], acc_b[r]);
    }
}
#define PAIR_CASES_OVER_3(WTYPE)                                            \
    case 3: pair_product(x, ldx, a, b, WTYPE, k, 3, ta, tb, ahead); break;  \
    case 4: pair_product(x, ldx, a, b, WTYPE, k, 4, ta, tb, ahead); break;  \
    case 5: pair_product(x, ldx, a, b, WTYPE, k, 5, ta, tb, ahead); break;
#else
#define PAIR_ROWS 3
/* The AVX2 pair: two panels' 8-wide halves, 4 accumulators a row, so at most 3 rows fit the 16
 * registers. Used for 2-3 rows only (decoding a few sequences), where one panel's tile has too
 * few accumulator chains and a single stream of weights in flight. The same per-element sums in
 * the same order as the other tiles. */
static inline __attribute__((always_inline)) void pair_product(const float *x, long ldx, const void *panel_a,
                                                                 const void *panel_b, int wtype, long k, int ROWS,
                                                                 Tile tile_a, Tile tile_b, const char *ahead) {
    __m256 a_low[PAIR_ROWS], a_high[PAIR_ROWS], b_low[PAIR_ROWS], b_high[PAIR_ROWS], wa0, wa1, wb0, wb1;
    for (int r = 0; r < ROWS; r++) a_low[r] = a_high[r] = b_low[r] = b_high[r] = _mm256_setzero_ps();
    const long row_bytes = PANEL * element_size(wtype), steps_per_line = 64 / row_bytes;
#pragma GCC unroll 2
    for (long j = 0; j < k; j++) {
        if (j % steps_per_line == 0) _mm_prefetch(ahead + j * row_bytes, _MM_HINT_T0);
        load_panel_row(panel_a, wtype, j, &wa0, &wa1);
        load_panel_row(panel_b, wtype, j, &wb0, &wb1);
        for (int r = 0; r < ROWS; r++) {
            const __m256 xv = _mm256_broadcast_ss(x + r * ldx + j);
            a_low[r] = _mm256_fmadd_ps(wa0, xv, a_low[r]);
            a_high[r] = _mm256_fmadd_ps(wa1, xv, a_high[r]);
            b_low[r] = _mm256_fmadd_ps(wb0, xv, b_low[r]);
            b_high[r] = _mm256_fmadd_ps(wb1, xv, b_high[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(tile_a[r], a_low[r]);
        _mm256_storeu_ps(tile_a[r] + 8, a_high[r]);
        _mm256_storeu_ps(tile_b[r], b_low[r]);
        _mm256_storeu_ps(tile_b[r] + 8, b_high[r]);
    }
}
#define PAIR_CASES_OVER_3(WTYPE)
#endif

#define DEFINE_PAIRS(NAME, WTYPE)                                                                               \
    static void pairs_##NAME(const float *x, long ldx, const void *a, const void *b, long k, int rows, Tile ta,  \
                             Tile tb, const char *ahead) {                                                      \
        switch (rows) {                                                                                         \
        case 1: pair_product(x, ldx, a, b, WTYPE, k, 1, ta, tb, ahead); break;                                  \
        case 2: pair_product(x, ldx, a, b, WTYPE, k, 2, ta, tb, ahead); break;                                  \
        PAIR_CASES_OVER_3(WTYPE)                                                                                \
        default: pair_product(x, ldx, a, b, WTYPE, k, PAIR_ROWS, ta, tb, ahead); break;                         \
        }                                                                                                       \
    }
DEFINE_PAIRS(f32, W_F32)
DEFINE_PAIRS(f16, W_F16)
DEFINE_PAIRS(bf16, W_BF16)
DEFINE_PAIRS(i8, W_I8)

static void pairs(const float *x, long ldx, const void *a, const void *b, int wtype, long k, int rows, Tile ta,
                  Tile tb, const char *ahead) {
    switch (wtype) {
    case W_F16: pairs_f16(x, ldx, a, b, k, rows, ta, tb, ahead); break;
    case W_BF16: pairs_bf16(x, ldx, a, b, k, rows, ta, tb, ahead); break;
    case W_I8: pairs_i8(x, ldx, a, b, k, rows, ta, tb, ahead); break;
    default: pairs_f32(x, ldx, a, b, k, rows, ta, tb, ahead); break;
    }
}

static inline __attribute__((always_inline)) void tile_product(const float *x, long ldx, const void *panel, int wtype,
                                                                 long k, int ROWS, Tile tile, const char *ahead) {
    if (ROWS == 1) {
#if HAVE_AVX512
        if (wtype == W_I8) {
            one_row_product_512(x, panel, wtype, k, tile, ahead);
            return;
        }
#endif
        one_row_product(x, panel, wtype, k, tile, ahead);
        return;
    }
#if HAVE_AVX512
    /* The same sums as the 8-wide path below, element by element in the same order (each
     * accumulator lane sums x[r][j] * w[j][c] for j ascending), so the results are identical. */
    {
        __m512 acc[TILE_ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        const long row_bytes = PANEL * element_size(wtype), steps_per_line = 64 / row_bytes;
#pragma GCC unroll 4
        for (long j = 0; j < k; j++) {
            if (j % steps_per_line == 0) _mm_prefetch(ahead + j * row_bytes, _MM_HINT_T0);
            const __m512 w = load_panel_row_512(panel, wtype, j);
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * ldx + j]), acc[r]);
        }
        for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(tile[r], acc[r]);
    }
#else
    __m256 low[TILE_ROWS], high[TILE_ROWS], w0, w1;
    for (int r = 0; r < ROWS; r++) low[r] = high[r] = _mm256_setzero_ps();
    const long row_bytes = PANEL * element_size(wtype), steps_per_line = 64 / row_bytes;
#define STEP(j)                                                                 \
    load_panel_row(panel, wtype, (j), &w0, &w1);                                \
    for (int r = 0; r < ROWS; r++) {                                            \
        __m256 xv = _mm256_broadcast_ss(x + r * ldx + (j));                     \
        low[r] = _mm256_fmadd_ps(w0, xv, low[r]);                               \
        high[r] = _mm256_fmadd_ps(w1, xv, high[r]);                             \
    }
#pragma GCC unroll 4
    for (long j = 0; j < k; j++) {
        if (j % steps_per_line == 0) _mm_prefetch(ahead + j * row_bytes, _MM_HINT_T0);
        STEP(j)
    }
#undef STEP
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(tile[r], low[r]);
        _mm256_storeu_ps(tile[r] + 8, high[r]);
    }
#endif
}

/* A panel's weights as float32 (k, PANEL), for the tiles of many rows. */
static void widen_panel(const void *panel, int wtype, long k, float *out) {
    __m256 low, high;
    const long row_bytes = PANEL * element_size(wtype);
    for (long j = 0; j < k; j++) {
        _mm_prefetch((const char *)panel + j * row_bytes + PREFETCH_BYTES, _MM_HINT_T0);
        load_panel_row(panel, wtype, j, &low, &high);
        _mm256_storeu_ps(out + j * PANEL, low);
        _mm256_storeu_ps(out + j * PANEL + 8, high);
    }
}
#else
#define HAVE_AVX2 0

/* The portable tile: the same arithmetic, left to the compiler's vectoriser. */
static inline void tile_product(const float *x, long ldx, const void *panel, int wtype, long k, int rows, Tile tile,
                                const char *ahead) {
    (void)ahead;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < PANEL; c++) tile[r][c] = 0.0f;
    float weights[PANEL];
    for (long j = 0; j < k; j++) {
        for (int c = 0; c < PANEL; c++) weights[c] = weight_at(panel, wtype, j * PANEL + c);
        for (int r = 0; r < rows; r++) {
            float xv = x[r * ldx + j];
#pragma omp simd
            for (int c = 0; c < PANEL; c++) tile[r][c] += xv * weights[c];
        }
    }
}

static void widen_panel(const void *panel, int wtype, long k, float *out) {
    for (long index = 0; index < k * PANEL; index++) out[index] = weight_at(panel, wtype, index);
}
#endif

int starchat_linear_has_avx2(void) { return HAVE_AVX2; }
int starchat_linear_has_avx512(void) { return HAVE_AVX512; }

#if TILE_ROWS > 6
#define TILE_CASES_OVER_6(WTYPE)                                                     \
    case 6: tile_product(x, ldx, panel, WTYPE, k, 6, tile, ahead); break;            \
    case 7: tile_product(x, ldx, panel, WTYPE, k, 7, tile, ahead); break;            \
    case 8: tile_product(x, ldx, panel, WTYPE, k, 8, tile, ahead); break;            \
    case 9: tile_product(x, ldx, panel, WTYPE, k, 9, tile, ahead); break;            \
    case 10: tile_product(x, ldx, panel, WTYPE, k, 10, tile, ahead); break;          \
    case 11: tile_product(x, ldx, panel, WTYPE, k, 11, tile, ahead); break;
#else
#define TILE_CASES_OVER_6(WTYPE)
#endif

/* One instance per (rows, weight type): constants let the compiler keep everything in registers. */
#define DEFINE_TILES(NAME, WTYPE)                                                                                        \
    static void tiles_##NAME(const float *x, long ldx, const void *panel, long k, int rows, Tile tile,              \
                             const char *ahead) {                                                                    \
        switch (rows) {                                                                                                  \
        case 1: tile_product(x, ldx, panel, WTYPE, k, 1, tile, ahead); break;                                                   \
        case 2: tile_product(x, ldx, panel, WTYPE, k, 2, tile, ahead); break;                                                   \
        case 3: tile_product(x, ldx, panel, WTYPE, k, 3, tile, ahead); break;                                                   \
        case 4: tile_product(x, ldx, panel, WTYPE, k, 4, tile, ahead); break;                                                   \
        case 5: tile_product(x, ldx, panel, WTYPE, k, 5, tile, ahead); break;                                                   \
        TILE_CASES_OVER_6(WTYPE)                                                                                         \
        default: tile_product(x, ldx, panel, WTYPE, k, TILE_ROWS, tile, ahead); break;                                          \
        }                                                                                                                \
    }
DEFINE_TILES(f32, W_F32)
DEFINE_TILES(f16, W_F16)
DEFINE_TILES(bf16, W_BF16)
DEFINE_TILES(i8, W_I8)

static void tiles(const float *x, long ldx, const void *panel, int wtype, long k, int rows, Tile tile,
                  const char *ahead) {
    switch (wtype) {
    case W_F16: tiles_f16(x, ldx, panel, k, rows, tile, ahead); break;
    case W_BF16: tiles_bf16(x, ldx, panel, k, rows, tile, ahead); break;
    case W_I8: tiles_i8(x, ldx, panel, k, rows, tile, ahead); break;
    default: tiles_f32(x, ldx, panel, k, rows, tile, ahead); break;
    }
}


#if HAVE_AVX2
/* starchat_linear_columns over panels taken in pairs (AVX-512: more than one row but 7-12; AVX2:
 * 2-3 rows), each thread's share of the pairs the same in every block of rows (as below, one
 * panel at a time). */
static void linear_columns_pairs(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
    const long blocks = (n + PANEL - 1) / PANEL, panel_bytes = k * PANEL * element_size(wtype), pairs_count = (blocks + 1) / 2;
    float *widened = wtype != W_F32 && m > PAIR_ROWS ? (float *)malloc((size_t)(2 * k * PANEL) * sizeof(float)) : NULL;
    Tile tile_a, tile_b;
    for (long row0 = 0; row0 < m; row0 += ROW_BLOCK) {
        const long rows = m - row0 < ROW_BLOCK ? m - row0 : ROW_BLOCK;
#pragma omp for schedule(static) nowait
        for (long pair = 0; pair < pairs_count; pair++) {
            const long block = 2 * pair;
            const int both = block + 1 < blocks; /* an odd last panel goes alone */
            const char *packed = (const char *)w + block * panel_bytes;
            const void *a = packed, *b = packed + panel_bytes;
            int type = wtype;
            if (widened) {
                widen_panel(a, wtype, k, widened);
                a = widened;
                if (both) {
                    widen_panel(b, wtype, k, widened + k * PANEL);
                    b = widened + k * PANEL;
                }
                type = W_F32;
            }
            const long n0 = block * PANEL, columns_a = n - n0 < PANEL ? n - n0 : PANEL;
            const long columns_b = n - n0 - PANEL < PANEL ? n - n0 - PANEL : PANEL;
            const long tile_count = (rows + PAIR_ROWS - 1) / PAIR_ROWS;
            for (long t = 0, i = 0; t < tile_count; t++) {
                const int tile_rows = (int)((rows - i) / (tile_count - t) + ((rows - i) % (tile_count - t) != 0));
                /* The first tile of a pair fetches the thread's next pair (static schedule: the next
                 * one) meanwhile; the hardware prefetcher follows the two panel streams. */
                const char *ahead = t == 0 ? packed + 2 * panel_bytes : (const char *)a;
                /* An odd last panel goes as its own pair (its second product unused): calling the
                 * one-panel tiles here too made GCC stop inlining them into
                 * starchat_linear_columns, which cost that path 10-25% at 4-6 rows. */
                pairs(x + (row0 + i) * k, k, a, both ? b : a, type, k, tile_rows, tile_a, tile_b, ahead);
                store_tile_rows(out, row0 + i, tile_rows, n0, columns_a, tile_a);
                if (both) store_tile_rows(out, row0 + i, tile_rows, n0 + PANEL, columns_b, tile_b);
                i += tile_rows;
            }
        }
    }
    free(widened);
#pragma omp barrier
}
#endif

#if HAVE_AVX512 && HAVE_INT8_ROWS && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define HAVE_VNNI_ROWS 1
/* Rows of int8 products per VNNI tile: two accumulators (hi, lo) a row, 24 of the 32 registers. */
#define VNNI_TILE_ROWS 12

/* The sums of `ROWS` quantized rows (hi / lo k_padded apart per row, in `parts`) and one int8 panel
 * as float32 (128 hi + lo) s per row, into tile. Each step takes four panel rows column by column,
 * made unsigned (w + 128; the rows' sums of 128 x part come off at the end), and adds their
 * four-byte dot products with each row's four values of hi and of lo (vpdpbusd). */
static inline __attribute__((always_inline)) void vnni_tile(const int8_t *parts, long k_padded, const float *scales,
                                                            const int32_t *sums, const int8_t *panel, long k, int ROWS,
                                                            Tile tile) {
    __m512i hi[VNNI_TILE_ROWS], lo[VNNI_TILE_ROWS];
    for (int r = 0; r < ROWS; r++) hi[r] = lo[r] = _mm512_setzero_si512();
    const __m512i to_unsigned = _mm512_set1_epi8((char)0x80);
    for (long j = 0; j < k; j += 4) {
        _mm_prefetch((const char *)(panel + j * PANEL) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512i weights = _mm512_xor_si512(four_rows_by_column(four_panel_rows(panel, k, j)), to_unsigned);
        for (int r = 0; r < ROWS; r++) {
            int32_t high, low;
            memcpy(&high, parts + 2 * r * k_padded + j, 4);
            memcpy(&low, parts + (2 * r + 1) * k_padded + j, 4);
            hi[r] = _mm512_dpbusd_epi32(hi[r], weights, _mm512_set1_epi32(high));
            lo[r] = _mm512_dpbusd_epi32(lo[r], weights, _mm512_set1_epi32(low));
        }
    }
    for (int r = 0; r < ROWS; r++) {
        const __m512 high = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi[r], _mm512_set1_epi32(128 * sums[2 * r])));
        const __m512 low = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo[r], _mm512_set1_epi32(128 * sums[2 * r + 1])));
        _mm512_storeu_ps(tile[r], _mm512_mul_ps(_mm512_fmadd_ps(high, _mm512_set1_ps(128.0f), low), _mm512_set1_ps(scales[r])));
    }
}

#define VNNI_CASE(R) case R: vnni_tile(parts, k_padded, scales, sums, panel, k, R, tile); break;
static void vnni_tile_rows(const int8_t *parts, long k_padded, const float *scales, const int32_t *sums, const int8_t *panel,
                           long k, int rows, Tile tile) {
    switch (rows) {
    VNNI_CASE(1) VNNI_CASE(2) VNNI_CASE(3) VNNI_CASE(4) VNNI_CASE(5) VNNI_CASE(6)
    VNNI_CASE(7) VNNI_CASE(8) VNNI_CASE(9) VNNI_CASE(10) VNNI_CASE(11) default: VNNI_CASE(12)
    }
}
#undef VNNI_CASE

/* int8 weights times m > 1 rows on a CPU with AVX512-VNNI (Ice Lake and later Xeons without AMX,
 * AMD Zen 4; on AMX Xeons the products their tiles do not take): the rows quantized to 15 bits in
 * two int8 parts as the AMX-INT8 products do (int8_rows.h), the panels read in their own bytes.
 * The float32 tiles widen every weight and do one FMA per weight and row; a dot product here does
 * four per 32-bit lane, two (hi, lo) per weight and row. Returns 0 (on every thread) when out of
 * memory, or for K over VNNI_MAX_K: a lane's sum of (w + 128) x part reaches 255 x 127 x K, which
 * must stay within int32. */
#define VNNI_MAX_K 65536
static int int8_vnni_columns(const float *x, long m, const int8_t *w, const Output *out, long n, long k) {
    if (k > VNNI_MAX_K) return 0;
    const long k_padded = (k + 63) / 64 * 64;
    int8_t *parts = NULL; /* per row hi, lo (k_padded each); then per row its scale and the parts' sums */
#pragma omp single copyprivate(parts)
    parts = (int8_t *)aligned_alloc(64, (size_t)((2 * m * k_padded + 12 * m + 63) / 64 * 64));
    if (!parts) return 0;
    float *scales = (float *)(parts + 2 * m * k_padded);
    int32_t *sums = (int32_t *)(scales + m);
#pragma omp for schedule(static)
    for (long r = 0; r < m; r++) {
        int8_t *hi = parts + 2 * r * k_padded, *lo = hi + k_padded;
        quantize_row_15_bits(x + r * k, k, k_padded, 64, hi, lo, &scales[r]);
        int32_t high = 0, low = 0;
        for (long j = 0; j < k; j++) {
            high += hi[j];
            low += lo[j];
        }
        sums[2 * r] = high;
        sums[2 * r + 1] = low;
    }
    const long blocks = (n + PANEL - 1) / PANEL, panel_bytes = k * PANEL;
    Tile tile;
    for (long row0 = 0; row0 < m; row0 += ROW_BLOCK) {
        const long rows = m - row0 < ROW_BLOCK ? m - row0 : ROW_BLOCK;
#pragma omp for schedule(static) nowait
        for (long block = 0; block < blocks; block++) {
            const int8_t *panel = w + block * panel_bytes;
            const long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
            const long tile_count = (rows + VNNI_TILE_ROWS - 1) / VNNI_TILE_ROWS;
            for (long t = 0, i = 0; t < tile_count; t++) { /* rows spread evenly over the tiles */
                const int tile_rows = (int)((rows - i) / (tile_count - t) + ((rows - i) % (tile_count - t) != 0));
                const long r = row0 + i;
                vnni_tile_rows(parts + 2 * r * k_padded, k_padded, scales + r, sums + 2 * r, panel, k, tile_rows, tile);
                store_tile_rows(out, r, tile_rows, n0, columns, tile);
                i += tile_rows;
            }
        }
    }
#pragma omp barrier
#pragma omp single
    free(parts);
    return 1;
}
#else
#define HAVE_VNNI_ROWS 0
#endif

/* y = x w^T for float32 x (m, k) and packed w, shared among the threads of the enclosing parallel
 * region (an orphaned work-sharing loop ending in a barrier; called outside a region it runs on
 * the calling thread). A thread takes the same panels in every block of rows and writes only
 * their columns, so no thread waits between blocks (nowait) until the closing barrier. */
void starchat_linear_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
    if (out->amx_min_rows > 0 && m >= out->amx_min_rows && starchat_amx_columns(x, m, w, wtype, out, n, k)) return;
#if HAVE_VNNI_ROWS
    if (wtype == W_I8 && m > 1 && int8_vnni_columns(x, m, (const int8_t *)w, out, n, k)) return;
#endif
#if HAVE_AVX512
    /* 7 to 12 rows (TILE_ROWS), one panel at a time: up to 12 accumulators on one panel row
     * (measured 0.15 against 0.31 ms for 8 rows of a 768 x 3072 product, pairs of panels making
     * two tiles of 4 over widened panels). 2 to 6 rows: one tile over a pair of panels, whose
     * 2 x rows accumulator chains hide the FMA latency that one panel's few chains wait on
     * (decoding 2-6 sequences on the Xeon, 16-bit weights, 400 MiB: 17-19 against 22-25 GB/s
     * at 2-3 rows, 16-17 against 20-22 at 5-6; 4 sequences of tiny_starcoder bf16 x1.16 end to end).
     * More rows: panels in pairs, 6 rows a tile (1.05-1.2x the single-panel tiles from 32 rows). */
    if (m > TILE_ROWS || (m >= 2 && m <= PAIR_ROWS)) {
        linear_columns_pairs(x, m, w, wtype, out, n, k);
        return;
    }
#elif HAVE_AVX2
    /* 2-3 rows: the AVX2 pair of panels (above): 16-bit weights 17-18 against 22-24 GB/s, float32
     * 21-22 against 24-27 (a Xeon built without AVX-512); int8 only at 2 rows (at 3 its
     * accumulators and widened halves outgrow the registers: 17 against 15). From 4 rows one
     * panel's tiles are as fast. */
    if (m == 2 || (m == 3 && wtype != W_I8)) {
        linear_columns_pairs(x, m, w, wtype, out, n, k);
        return;
    }
#endif
    const long blocks = (n + PANEL - 1) / PANEL, panel_bytes = k * PANEL * element_size(wtype);
    /* Widening a 16-bit or int8 panel once pays for itself from the second tile of rows. A
     * thread whose allocation failed reads its panels in their own type: every thread must meet
     * the same work-sharing loops. */
    float *widened = wtype != W_F32 && m > TILE_ROWS ? (float *)malloc((size_t)(k * PANEL) * sizeof(float)) : NULL;
    Tile tile;
    for (long row0 = 0; row0 < m; row0 += ROW_BLOCK) {
        const long rows = m - row0 < ROW_BLOCK ? m - row0 : ROW_BLOCK;
#pragma omp for schedule(static) nowait
        for (long block = 0; block < blocks; block++) {
            const char *packed = (const char *)w + block * panel_bytes;
            const void *panel = packed;
            int type = wtype;
            if (widened) {
                widen_panel(panel, wtype, k, widened);
                panel = widened;
                type = W_F32;
            }
            const long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
            /* Rows spread evenly over the tiles (32 rows: 6+6+5+5+5+5, not 6+6+6+6+6+2: a thin
             * tile does as many loads for fewer FMAs). */
            const long tile_count = (rows + TILE_ROWS - 1) / TILE_ROWS;
            for (long t = 0, i = 0; t < tile_count; t++) {
                const int tile_rows = (int)((rows - i) / (tile_count - t) + ((rows - i) % (tile_count - t) != 0));
                /* Prefetching: a tile reading the packed panel in place first streams it from
                 * memory (prefetch ahead in that stream); the next tile finds it in cache and
                 * fetches the thread's next panel (static schedule: the next block) meanwhile,
                 * as does the first tile over a widened panel (widen_panel streamed this one).
                 * Other tiles point the prefetch at lines already cached. */
                const char *ahead = (const char *)panel;
                if (panel == packed)
                    ahead = t == 0 ? packed + PREFETCH_BYTES : t == 1 ? packed + panel_bytes : ahead;
                else if (t == 0)
                    ahead = packed + panel_bytes;
                tiles(x + (row0 + i) * k, k, panel, type, k, tile_rows, tile, ahead);
                store_tile_rows(out, row0 + i, tile_rows, n0, columns, tile);
                i += tile_rows;
            }
        }
    }
    free(widened);
#pragma omp barrier
}

/* ---- unpacking panels back to rows (the AMX products' weights, unpacked per call) ---------- */

/* Panel rows j0 .. j0 + 15 of a bfloat16 or int8 panel as bfloat16 (int8 values are exact). */
static inline void panel_rows_as_bf16(const void *panel, int wtype, long j0, uint16_t rows[16][PANEL]) {
    if (wtype == W_BF16) {
        memcpy(rows, (const uint16_t *)panel + j0 * PANEL, 16 * PANEL * sizeof(uint16_t));
        return;
    }
    const int8_t *values = (const int8_t *)panel + j0 * PANEL;
    int i = 0;
#if HAVE_AVX2
    for (; i < 16 * PANEL; i += 8) { /* exact in float32, so its high half is the bfloat16 */
        const __m256 widened = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(values + i))));
        const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(widened), 16);
        _mm_storeu_si128((__m128i *)((uint16_t *)rows + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
    }
#endif
    for (; i < 16 * PANEL; i++) ((uint16_t *)rows)[i] = f32_to_bf16((float)values[i]);
}

#if HAVE_AVX2
/* out[c * ldo + j] = rows[j][c] for a 16 x 16 block of 16-bit values: an 8 x 8 transpose of
 * 32-bit pairs (columns 2i, 2i + 1) for each half of the rows, then the pairs split by packing
 * their low and high halves. */
static inline void transpose_16x16(uint16_t rows[16][PANEL], uint16_t *out, long ldo) {
    __m256i columns[2][8];
    for (int half = 0; half < 2; half++) {
        __m256i r[8], t[8], u[8];
        for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)rows[8 * half + i]);
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
            u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
            u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
            u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
            u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        for (int i = 0; i < 4; i++) {
            columns[half][i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
            columns[half][i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
        }
    }
    const __m256i low = _mm256_set1_epi32(0xffff);
    for (int i = 0; i < 8; i++) { /* pair i: columns 2i (low halves) and 2i + 1 (high halves) */
        const __m256i a = columns[0][i], b = columns[1][i];
        const __m256i even = _mm256_packus_epi32(_mm256_and_si256(a, low), _mm256_and_si256(b, low));
        const __m256i odd = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
        _mm256_storeu_si256((__m256i *)(out + (2 * i) * ldo), _mm256_permute4x64_epi64(even, 0xD8));
        _mm256_storeu_si256((__m256i *)(out + (2 * i + 1) * ldo), _mm256_permute4x64_epi64(odd, 0xD8));
    }
}
#endif

/* out (n, k), bfloat16, row-major: the weight held in packed panels of bfloat16 or int8 (as
 * bfloat16: int8 values are exact; scales are not applied). PyTorch's permuted copy did this at
 * about 12 GB/s moved; 16 x 16 register transposes here. Returns 0, or -1 for another type. */
int starchat_unpack_bf16(const void *w, int wtype, long n, long k, uint16_t *out, int threads) {
    if (wtype != W_BF16 && wtype != W_I8) return -1;
    const long blocks = (n + PANEL - 1) / PANEL, panel_bytes = k * PANEL * element_size(wtype);
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (long block = 0; block < blocks; block++) {
        const char *panel = (const char *)w + block * panel_bytes;
        const long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
        long j0 = 0;
#if HAVE_AVX2
        uint16_t rows[16][PANEL];
        if (columns == PANEL)
            for (; j0 + 16 <= k; j0 += 16) {
                panel_rows_as_bf16(panel, wtype, j0, rows);
                transpose_16x16(rows, out + n0 * k + j0, k);
            }
#endif
        for (long j = j0; j < k; j++) /* the tails: the last rows of K, a partial last panel */
            for (long c = 0; c < columns; c++) {
                const long at = j * PANEL + c;
                out[(n0 + c) * k + j] = wtype == W_BF16 ? ((const uint16_t *)panel)[at]
                                                        : f32_to_bf16((float)((const int8_t *)panel)[at]);
            }
    }
    return 0;
}

/* Per-channel int8 quantization of a weight w (n, k) of W_F32, W_F16 or W_BF16, row-major: scales[r] =
 * max(max |w[r]|, 1e-8) / 127 and out[r][j] = round-half-even(w[r][j] / scales[r]) within [-127, 127],
 * in float32, the same bits as quant.quantize_per_channel's PyTorch expression. That expression
 * took about 65 of the 107 s StarChat-beta needed to load with --quantize int8 on a 2-core Xeon
 * (each step a pass over a fresh 50 MB temporary; 41.5 s with this); here each row is read once
 * into a float32 copy in cache and written once.
 * Returns 0, -1 for another type, -2 when out of memory, -3 when a value is NaN or infinite (no
 * scale can stand for such a row). */
int starchat_quantize_rows(const void *w, int wtype, long n, long k, int8_t *out, float *scales, int threads) {
    if (wtype != W_F32 && wtype != W_F16 && wtype != W_BF16) return -1;
    int failed = 0, nonfinite = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *row = (float *)malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
        /* every thread meets the loop (a worksharing construct), a thread without memory skips its rows' work */
#pragma omp for schedule(static)
        for (long r = 0; r < n; r++) {
            if (!row) continue;
            widen_to_float32((const char *)w + r * k * element_size(wtype), wtype, k, row);
            float largest = 0.0f;
            int bad = 0; /* a NaN or an infinity in the row */
            long j = 0;
#if HAVE_AVX2
            __m256 top = _mm256_setzero_ps(), unbounded = _mm256_setzero_ps();
            const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), infinity = _mm256_set1_ps(INFINITY);
            for (; j + 8 <= k; j += 8) {
                const __m256 value = _mm256_and_ps(_mm256_loadu_ps(row + j), magnitude);
                top = _mm256_max_ps(top, value);
                unbounded = _mm256_or_ps(unbounded, _mm256_cmp_ps(value, infinity, _CMP_NLT_UQ)); /* NaN or inf */
            }
            float lanes[8];
            _mm256_storeu_ps(lanes, top);
            for (int lane = 0; lane < 8; lane++) largest = lanes[lane] > largest ? lanes[lane] : largest;
            bad = _mm256_movemask_ps(unbounded) != 0;
#endif
            for (; j < k; j++) {
                const float value = row[j] < 0 ? -row[j] : row[j];
                bad |= !(value < INFINITY);
                largest = value > largest ? value : largest;
            }
            if (bad) {
#pragma omp atomic write
                nonfinite = 1;
            }
            const float scale = (largest > 1e-8f ? largest : 1e-8f) / 127.0f;
            scales[r] = scale;
            int8_t *target = out + r * k;
            j = 0;
#if HAVE_AVX2
            const __m256 divisor = _mm256_set1_ps(scale), low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
            for (; j + 8 <= k; j += 8) {
                __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + j), divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256i whole = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, low), high));
                const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1));
                _mm_storel_epi64((__m128i *)(target + j), _mm_packs_epi16(words, words));
            }
#endif
            for (; j < k; j++) {
                float q = __builtin_rintf(row[j] / scale); /* the default rounding mode: to nearest, ties to even */
                q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
                target[j] = (int8_t)q;
            }
        }
        free(row);
    }
    return failed ? -2 : nonfinite ? -3 : 0;
}

/* The entry point: y (m, n) = activation(x (m, k) @ w^T, times scales, plus bias), for w packed
 * into panels. x and y are W_F32, W_F16 or W_BF16; w any weight type; activation ACTIVATION_NONE or
 * ACTIVATION_GELU_TANH; from amx_min_rows rows (0: never) a bfloat16, int8 or float16 product goes
 * to AMX tiles where starchat_amx_init() was granted them. Returns 0, -1 for a type it does not
 * know, -2 when out of memory. */
int starchat_linear(const void *x, int xtype, long m, const void *w, int wtype, const float *scales,
                    const float *bias, void *y, int ytype, long n, long k, int threads, long amx_min_rows, int activation) {
    if (wtype < W_F32 || wtype > W_I8 || xtype < W_F32 || xtype > W_BF16 || ytype < W_F32 || ytype > W_BF16) return -1;
    if (activation != ACTIVATION_NONE && activation != ACTIVATION_GELU_TANH) return -1;
    if (m <= 0) return 0;
    float *widened = NULL;
    if (xtype != W_F32) {
        widened = (float *)malloc((size_t)(m * k) * sizeof(float));
        if (!widened) return -2;
    }
    const float *rows = widened ? widened : (const float *)x;
    Output out = {y, ytype, n, scales, bias, amx_min_rows, activation};
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        if (widened) {
#pragma omp for schedule(static)
            for (long r = 0; r < m; r++) widen_to_float32((const uint16_t *)x + r * k, xtype, k, widened + r * k);
        }
        starchat_linear_columns(rows, m, w, wtype, &out, n, k);
    }
    free(widened);
    return 0;
}

/* Whether int8 products of more than one row quantize the rows to 15 bits (int8_rows.h) in this
 * build (VNNI, without AMX tiles or below their rows), rather than multiply float32 rows. */
int starchat_linear_int8_rows_quantized(void) { return HAVE_VNNI_ROWS; }
