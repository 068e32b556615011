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

static inline long element_size(int wtype) { return wtype == W_F32 ? 4 : (wtype == W_I8 ? 1 : 2); }


static inline void finish(const Output *out, long row, long n, float sum) {
    if (out->scales) sum *= out->scales[n];
    if (out->bias) sum += out->bias[n];
    long index = row * out->n_total + n;
    switch (out->type) {
    case W_F16: ((uint16_t *)out->data)[index] = f32_to_f16(sum); break;
    case W_BF16: ((uint16_t *)out->data)[index] = f32_to_bf16(sum); break;
    default: ((float *)out->data)[index] = sum;
    }
}

/* One output column n for all m rows, scalar: used for the N tail and the portable path. */
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

#else
#define HAVE_AVX2 0
#endif

int starchat_linear_has_avx2(void) { return HAVE_AVX2; }

/* The columns of y = x w^T, shared among the threads of the enclosing parallel region (an
 * orphaned work-sharing loop; called outside a region it runs on the calling thread). x is
 * float32 (m, k). */
void starchat_linear_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
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
