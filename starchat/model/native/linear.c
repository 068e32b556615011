/* starchat's CPU matrix products for few rows: Y[m, n] = sum_k X[m, k] * W[n, k] (* scale[n]) (+ bias[n]).
 *
 * Decoding one or a few sequences multiplies a handful of activation rows by every weight
 * matrix, so the cost is reading the weights from memory once. These loops stream each weight
 * row exactly once per call, convert it to float32 in registers (float16, bfloat16, int8 with a
 * per-output-channel scale, or float32 as is) and reuse it for every activation row. X and Y
 * are float32, float16 or bfloat16 (the arithmetic is float32), so the caller converts nothing.
 *
 * Compiled on the user's machine with -march=native (see build.py): the AVX2 path is used where
 * the CPU has AVX2, FMA and F16C, and a portable loop (vectorised by the compiler) elsewhere.
 * Threads: OpenMP, the same runtime PyTorch loads, with the thread count the caller passes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define STARCHAT_LINEAR_ABI 2

int starchat_linear_abi(void) { return STARCHAT_LINEAR_ABI; }

static inline void finish(const Output *out, long row, long n, float sum) {
    if (out->scales) sum *= out->scales[n];
    if (out->bias) sum += out->bias[n];
    store_as(out->data, out->type, row * out->n_total + n, sum);
}

/* One output column n for all m rows: the portable path (CPUs without AVX2, FMA and F16C). */
__attribute__((unused)) static void column_scalar(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
    const char *row = (const char *)w + n * k * element_size(wtype);
    for (long i = 0; i < m; i++) {
        const float *xi = x + i * k;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (long j = 0; j < k; j++) sum += weight_at(row, wtype, j) * xi[j];
        finish(out, i, n, sum);
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1

static inline __m256 load8(const void *w, int wtype, long index) {
    switch (wtype) {
    case W_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + index)));
    case W_BF16: {
        __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + index));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    case W_I8: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + index))));
    default: return _mm256_loadu_ps((const float *)w + index);
    }
}

static inline float horizontal_sum(__m256 v) {
    __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
    low = _mm_add_ps(low, high);
    low = _mm_hadd_ps(low, low);
    low = _mm_hadd_ps(low, low);
    return _mm_cvtss_f32(low);
}

/* Weight rows are taken one at a time, in memory order, so each thread reads one sequential
 * stream (the hardware prefetcher's best case; interleaving four rows measured 1.5x slower),
 * helped by a software prefetch PREFETCH_BYTES ahead. Each 8-wide weight load feeds up to four
 * activation rows; more activation rows re-read the weight row from L1. UNROLL independent
 * accumulators per activation row hide the FMA latency. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif
#define DEFINE_ROW_DOT(ROWS, UNROLL)                                                                     \
    static inline void row_dot_##ROWS(const void *w, int wtype, long base, const float *x, long k,     \
                                      float *sums) {                                                    \
        __m256 acc[ROWS][UNROLL];                                                                       \
        for (int r = 0; r < ROWS; r++)                                                                  \
            for (int u = 0; u < UNROLL; u++) acc[r][u] = _mm256_setzero_ps();                           \
        const long step = 8 * UNROLL, size = element_size(wtype);                                       \
        const char *bytes = (const char *)w + base * size;                                              \
        long j = 0;                                                                                     \
        for (; j + step <= k; j += step) {                                                              \
            for (long b = 0; b < step * size; b += 64) _mm_prefetch(bytes + j * size + PREFETCH_BYTES + b, _MM_HINT_T0); \
            for (int u = 0; u < UNROLL; u++) {                                                          \
                __m256 weights = load8(w, wtype, base + j + 8 * u);                                     \
                for (int r = 0; r < ROWS; r++)                                                          \
                    acc[r][u] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + r * k + j + 8 * u), acc[r][u]); \
            }                                                                                           \
        }                                                                                               \
        for (; j + 8 <= k; j += 8) {                                                                    \
            __m256 weights = load8(w, wtype, base + j);                                                 \
            for (int r = 0; r < ROWS; r++)                                                              \
                acc[r][0] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + r * k + j), acc[r][0]);        \
        }                                                                                               \
        for (int r = 0; r < ROWS; r++) {                                                                \
            __m256 total = acc[r][0];                                                                   \
            for (int u = 1; u < UNROLL; u++) total = _mm256_add_ps(total, acc[r][u]);                   \
            sums[r] = horizontal_sum(total);                                                            \
        }                                                                                               \
        for (; j < k; j++) { /* k not a multiple of 8 */                                                \
            float weight = weight_at(w, wtype, base + j);                                               \
            for (int r = 0; r < ROWS; r++) sums[r] += weight * x[r * k + j];                            \
        }                                                                                               \
    }
DEFINE_ROW_DOT(1, 4)
DEFINE_ROW_DOT(2, 2)
DEFINE_ROW_DOT(3, 2)
DEFINE_ROW_DOT(4, 2)

static inline void column_avx2(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
    float sums[4];
    for (long i = 0; i < m; i += 4) {
        long chunk = m - i < 4 ? m - i : 4;
        const float *xi = x + i * k;
        switch (chunk) {
        case 1: row_dot_1(w, wtype, n * k, xi, k, sums); break;
        case 2: row_dot_2(w, wtype, n * k, xi, k, sums); break;
        case 3: row_dot_3(w, wtype, n * k, xi, k, sums); break;
        default: row_dot_4(w, wtype, n * k, xi, k, sums); break;
        }
        for (long r = 0; r < chunk; r++) finish(out, i + r, n, sums[r]);
    }
}


/* Many activation rows (a batch of decodes) make the product compute-bound, and a dot product
 * per output re-reads the activations for every weight row. Instead, PANEL weight columns at a
 * time are transposed into a per-thread panel (k, PANEL) in float32, once per call, and an
 * outer-product kernel multiplies ROWS activation rows by the panel: per k, two panel loads and
 * ROWS broadcasts feed 2 * ROWS FMAs with the accumulators in registers (12 of 16 for ROWS 6). */
#define PANEL 16
#define PANEL_MIN_ROWS 24 /* measured crossover with the dot-product path (bench/cpu_kernels.py) */

/* rows[0..7] (8 floats each) -> out[e * stride + c] = rows[c][e]: an 8 x 8 transpose in registers. */
static inline void transpose8_store(__m256 r[8], float *out, long stride) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(out + 0 * stride, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(out + 1 * stride, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(out + 2 * stride, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(out + 3 * stride, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(out + 4 * stride, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(out + 5 * stride, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(out + 6 * stride, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(out + 7 * stride, _mm256_permute2f128_ps(u3, u7, 0x31));
}

static void fill_panel(const void *w, int wtype, long n0, long columns, long k, float *panel) {
    long j = 0;
    __m256 rows[8];
    for (; j + 8 <= k; j += 8) /* 8 k-steps of PANEL columns: two 8 x 8 transposes */
        for (long half = 0; half < PANEL; half += 8) {
            for (long c = 0; c < 8; c++) {
                if (half + c >= columns) {
                    rows[c] = _mm256_setzero_ps();
                    continue;
                }
                long at = (n0 + half + c) * k + j;
                rows[c] = load8(w, wtype, at);
            }
            transpose8_store(rows, panel + j * PANEL + half, PANEL);
        }
    for (; j < k; j++)
        for (long c = 0; c < PANEL; c++) panel[j * PANEL + c] = c < columns ? weight_at(w, wtype, (n0 + c) * k + j) : 0.0f;
}

#define DEFINE_PANEL_KERNEL(ROWS)                                                                      \
    static inline void panel_rows_##ROWS(const float *x, long k, const float *panel, float sums[][PANEL]) { \
        __m256 low[ROWS], high[ROWS];                                                                  \
        for (int r = 0; r < ROWS; r++) low[r] = high[r] = _mm256_setzero_ps();                         \
        for (long j = 0; j < k; j++) {                                                                 \
            __m256 p0 = _mm256_loadu_ps(panel + j * PANEL), p1 = _mm256_loadu_ps(panel + j * PANEL + 8); \
            for (int r = 0; r < ROWS; r++) {                                                           \
                __m256 xv = _mm256_broadcast_ss(x + r * k + j);                                        \
                low[r] = _mm256_fmadd_ps(p0, xv, low[r]);                                              \
                high[r] = _mm256_fmadd_ps(p1, xv, high[r]);                                            \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < ROWS; r++) {                                                               \
            _mm256_storeu_ps(sums[r], low[r]);                                                         \
            _mm256_storeu_ps(sums[r] + 8, high[r]);                                                    \
        }                                                                                              \
    }
DEFINE_PANEL_KERNEL(6)
DEFINE_PANEL_KERNEL(4)
DEFINE_PANEL_KERNEL(2)
DEFINE_PANEL_KERNEL(1)

static void panel_block(const float *x, long m, const void *w, int wtype, const Output *out, long n0, long columns,
                        long k, float *panel) {
    fill_panel(w, wtype, n0, columns, k, panel);
    float sums[6][PANEL];
    for (long i = 0; i < m;) {
        long rows = m - i >= 6 ? 6 : (m - i >= 4 ? 4 : (m - i >= 2 ? 2 : 1));
        const float *xi = x + i * k;
        switch (rows) {
        case 6: panel_rows_6(xi, k, panel, sums); break;
        case 4: panel_rows_4(xi, k, panel, sums); break;
        case 2: panel_rows_2(xi, k, panel, sums); break;
        default: panel_rows_1(xi, k, panel, sums); break;
        }
        for (long r = 0; r < rows; r++)
            for (long c = 0; c < columns; c++) finish(out, i + r, n0 + c, sums[r][c]);
        i += rows;
    }
}
#else
#define HAVE_AVX2 0
#endif

int starchat_linear_has_avx2(void) { return HAVE_AVX2; }

/* The columns of y = x w^T, shared among the threads of the enclosing parallel region (an
 * orphaned work-sharing loop; called outside a region it runs on the calling thread). x is
 * float32 (m, k). */
void starchat_linear_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
#if HAVE_AVX2
    if (m >= PANEL_MIN_ROWS) {
        /* Every thread of the region gets its own panel. All threads must meet the same
         * work-sharing loop, so one whose allocation failed still takes its blocks, through the
         * dot-product kernel. */
        float *panel = (float *)malloc((size_t)(k * PANEL) * sizeof(float));
#pragma omp for schedule(static)
        for (long block = 0; block < (n + PANEL - 1) / PANEL; block++) {
            long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
            if (panel)
                panel_block(x, m, w, wtype, out, n0, columns, k, panel);
            else
                for (long column = n0; column < n0 + columns; column++) column_avx2(x, m, w, wtype, out, column, k);
        }
        free(panel);
        return;
    }
#endif
#pragma omp for schedule(static)
    for (long column = 0; column < n; column++) {
#if HAVE_AVX2
        column_avx2(x, m, w, wtype, out, column, k);
#else
        column_scalar(x, m, w, wtype, out, column, k);
#endif
    }
}

/* The entry point: y (m, n) = x (m, k) @ w (n, k)^T, times scales, plus bias. x and y are
 * W_F32, W_F16 or W_BF16; w any weight type. Returns 0, -1 for a type it does not know, -2 when
 * out of memory. */
int starchat_linear(const void *x, int xtype, long m, const void *w, int wtype, const float *scales,
                    const float *bias, void *y, int ytype, long n, long k, int threads) {
    if (wtype < W_F32 || wtype > W_I8 || xtype < W_F32 || xtype > W_BF16 || ytype < W_F32 || ytype > W_BF16) return -1;
    const float *rows = (const float *)x;
    float *widened = NULL;
    if (xtype != W_F32) { /* a few activation rows: widen them once, single-threaded */
        widened = (float *)malloc((size_t)(m * k) * sizeof(float));
        if (!widened) return -2;
        for (long index = 0; index < m * k; index++) widened[index] = weight_at(x, xtype, index);
        rows = widened;
    }
    Output out = {y, ytype, n, scales, bias};
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    starchat_linear_columns(rows, m, w, wtype, &out, n, k);
    free(widened);
    return 0;
}
