/* Activation rows and weight rows for int8-by-int8 products (amx.c's AMX-INT8 tiles): each
 * activation row quantized to 15 bits in two int8 parts, a = s (128 hi + lo) with
 * s = max |a| / QUANT_LEVELS, |hi| <= 127, |lo| <= 64. The error is at most s / 2 =
 * max |a| / 32,512 per activation, where rounding it to bfloat16 costs up to |a| / 512: finer for
 * every activation above 1/64 of its row's largest. Integer sums of each part are exact; the
 * caller turns them into (128 hi + lo) s in float32. */
#ifndef STARCHAT_INT8_ROWS_H
#define STARCHAT_INT8_ROWS_H
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_INT8_ROWS 1
#define QUANT_LEVELS 16256.0f /* 127 x 128 */

/* Row x (k float32; NULL: a padding row) as its hi and lo parts, zeros up to k_padded (a multiple
 * of 64), and its scale s. Value j goes to offset j / 64 * step_stride + j % 64 of hi and lo: 64
 * for a plain row, 1024 for AMX tile order (16 rows' 64 values of a step of K side by side). A row
 * with an infinity or NaN gets a NaN scale (its outputs are NaN). */
static void quantize_row_15_bits(const float *x, long k, long k_padded, long step_stride, int8_t *hi, int8_t *lo,
                                 float *scale) {
    float largest = 0.0f;
    long j = 0;
    if (x) {
        /* v - v is 0 for finite v, NaN for an infinity or NaN (which max would pass over) */
        __m512 top = _mm512_setzero_ps(), not_finite = _mm512_setzero_ps();
        for (; j + 16 <= k; j += 16) {
            const __m512 v = _mm512_loadu_ps(x + j);
            top = _mm512_max_ps(top, _mm512_abs_ps(v));
            not_finite = _mm512_or_ps(not_finite, _mm512_sub_ps(v, v));
        }
        largest = _mm512_reduce_max_ps(top);
        int finite = _mm512_test_epi32_mask(_mm512_castps_si512(not_finite), _mm512_castps_si512(not_finite)) == 0;
        for (; j < k; j++) {
            largest = fmaxf(largest, fabsf(x[j]));
            finite = finite && isfinite(x[j]);
        }
        if (!finite) largest = NAN;
    }
    const int usable = x && isfinite(largest) && largest > 0.0f;
    *scale = !x ? 0.0f : usable ? largest / QUANT_LEVELS : isfinite(largest) ? 0.0f : NAN;
    const float inverse = usable ? QUANT_LEVELS / largest : 0.0f;
#define AT(j) ((j) / 64 * step_stride + (j) % 64)
    j = 0;
    if (usable)
        for (; j + 16 <= k; j += 16) { /* 16 values never straddle two steps of 64 */
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(inverse)));
            const __m512i high = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(64)), 7);
            _mm_storeu_si128((__m128i *)(hi + AT(j)), _mm512_cvtepi32_epi8(high));
            _mm_storeu_si128((__m128i *)(lo + AT(j)), _mm512_cvtepi32_epi8(_mm512_sub_epi32(q, _mm512_slli_epi32(high, 7))));
        }
    for (; j < k_padded; j++) {
        const int q = usable && j < k ? (int)lrintf(x[j] * inverse) : 0;
        const int high = (q + 64) >> 7;
        hi[AT(j)] = (int8_t)high;
        lo[AT(j)] = (int8_t)(q - high * 128);
    }
#undef AT
}

#if defined(__AVX512VBMI__)
/* Four panel rows of 16 int8 (64 bytes) column by column: byte 4c + i is row i's column c, the
 * layout of AMX-INT8's B tiles (and of VNNI's four-byte dot products). One byte permutation. */
static inline __m512i four_rows_by_column(__m512i rows) {
    const __m512i gather = _mm512_set_epi8(63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12,
                                           59, 43, 27, 11, 58, 42, 26, 10, 57, 41, 25, 9, 56, 40, 24, 8,
                                           55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21, 5, 52, 36, 20, 4,
                                           51, 35, 19, 3, 50, 34, 18, 2, 49, 33, 17, 1, 48, 32, 16, 0);
    return _mm512_permutexvar_epi8(gather, rows);
}

/* Panel rows row .. row + 3 (PANEL int8 each) of a panel whose rows end at k: past k zeros (a
 * masked load: the last panel's bytes end there). */
static inline __m512i four_panel_rows(const int8_t *panel, long k, long row) {
    if (row + 4 <= k) return _mm512_loadu_si512((const void *)(panel + row * 16));
    if (row >= k) return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (16 * (k - row))) - 1), panel + row * 16);
}
#endif
#else
#define HAVE_INT8_ROWS 0
#endif
#endif
