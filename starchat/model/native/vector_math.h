/* Vectorised float32 math shared by the kernels (AVX2 + FMA builds only). */
#ifndef STARCHAT_VECTOR_MATH_H
#define STARCHAT_VECTOR_MATH_H
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* exp(x) for x <= 0 (scores minus their maximum), float32: 2^n * p(r) with x = n ln2 + r and a
 * degree-6 polynomial for e^r on |r| <= ln2 / 2 (relative error about 2e-7); -inf gives 0, NaN NaN. */
static inline __m256 exp_negative(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.0f);
    __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(lowest, x); /* this operand order keeps a NaN (max returns its second operand then) */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
    return _mm256_andnot_ps(underflow, result);
}

/* 2^f for |f| <= 1/2: degree-6 Taylor polynomial of e^(f ln2), relative error about 1e-7. */
static inline __m256 exp2_fraction8(__m256 f) {
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022650695910071f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.69314718055994531f));
    return _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
}

/* 2^x for x in [-126, 126] (clamped to it; NaN stays NaN), float32: 2^n p(f), x = n + f, |f| <= 1/2,
 * 2^n exact. */
static inline __m256 exp2_clamped8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(126.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), x)); /* operand order keeps a NaN */
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(exp2_fraction8(_mm256_sub_ps(x, n)), _mm256_castsi256_ps(power));
}

/* GELU, tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as
 * x / (1 + 2^z), z = -2 u log2(e) = x (A + B x^2): one exponential and one division. Through tanh
 * it took twice the operations (512 x 3,072 values on a 2-core Xeon: 0.23 against 0.46 ms) and lost
 * the negative tail to cancellation in 1 + tanh (relative error 5e-4 at -4, 0.35 at -5, zero from
 * -5.07 on; now under 1e-5). */
#define GELU_A (-2.0f * 0.7978845608028654f * 1.4426950408889634f)
#define GELU_B (GELU_A * 0.044715f)
static inline __m256 gelu_tanh8(__m256 x) {
    const __m256 z = _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_set1_ps(GELU_B), _mm256_mul_ps(x, x), _mm256_set1_ps(GELU_A)));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp2_clamped8(z)));
}

#if defined(__AVX512F__)
/* The same functions 16 wide: the same operations per lane, so the same bits as the 8-wide ones
 * (a GELU over 128 rows of tiny_starcoder's 3,072-wide MLP: 0.084 against 0.109 ms 8 wide). */
static inline __m512 exp_negative16(__m512 x) {
    const __m512 lowest = _mm512_set1_ps(-87.0f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
    x = _mm512_max_ps(lowest, x); /* this operand order keeps a NaN, as above */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps((__mmask16)~underflow, _mm512_mul_ps(p, _mm512_castsi512_ps(exponent)));
}

static inline __m512 exp2_fraction16(__m512 f) { /* exp2_fraction8, 16 wide */
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022650695910071f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718055994531f));
    return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}

/* 2^n p(f) for x = n + f, |f| <= 1/2, the power of two applied by vscalefps (exactly, as the 8-wide
 * multiply, wherever the result is a normal float). */
static inline __m512 exp2_scaled16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_fraction16(_mm512_sub_ps(x, n)), n);
}

/* 2^x for x <= 0, float32: 2^n * p(f) with x = n + f, |f| <= 1/2, p degree 6 (Taylor of e^(f ln2):
 * relative error about 1e-7), the power of two applied by vscalefps; below -127 the result is
 * 2^-127 or less (callers zero what must be zero), NaN stays NaN. 9 operations where
 * exp_negative16 takes 16: prompt attention exponentiates every score. */
static inline __m512 exp2_nonpositive16(__m512 x) {
    return exp2_scaled16(_mm512_max_ps(_mm512_set1_ps(-127.0f), x)); /* this operand order keeps a NaN */
}

/* exp2_nonpositive16 for results rounded to bfloat16 (8 significant bits): degree 3 (minimax),
 * relative error under 7.5e-5 where a bfloat16 rounding is up to 2e-3; three operations fewer
 * (prompt attention's bfloat16 softmax weights: one layer 4-9% faster). */
static inline __m512 exp2_nonpositive16_bf16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x); /* this operand order keeps a NaN */
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(0.05517132207751274f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24261054396629333f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932609677314758f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999281167984009f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 exp2_clamped16(__m512 x) { /* exp2_clamped8, 16 wide */
    return exp2_scaled16(_mm512_min_ps(_mm512_set1_ps(126.0f), _mm512_max_ps(_mm512_set1_ps(-126.0f), x)));
}

static inline __m512 gelu_tanh16(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_set1_ps(GELU_B), _mm512_mul_ps(x, x), _mm512_set1_ps(GELU_A)));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp2_clamped16(z)));
}
#endif
#endif
#endif
