/* Element types shared by starchat's native kernels, and scalar conversions to and from float32. */
#ifndef STARCHAT_CONVERT_H
#define STARCHAT_CONVERT_H
#include <stdint.h>
#include <string.h>

enum { W_F32 = 0, W_F16 = 1, W_BF16 = 2, W_I8 = 3 };

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}
static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}
static inline float weight_at(const void *w, int wtype, long index) {
    switch (wtype) {
    case W_F16: return f16_to_f32(((const uint16_t *)w)[index]);
    case W_BF16: return bf16_to_f32(((const uint16_t *)w)[index]);
    case W_I8: return (float)((const int8_t *)w)[index];
    default: return ((const float *)w)[index];
    }
}
/* count values of `type` (W_F32, W_F16 or W_BF16) as float32: activation rows, cache rows. */
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif
static inline void widen_to_float32(const void *row, int type, long count, float *out) {
    long i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    if (type == W_F16)
        for (; i + 8 <= count; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i))));
    else if (type == W_BF16)
        for (; i + 8 <= count; i += 8) {
            __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
            _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
        }
#endif
    for (; i < count; i++) out[i] = weight_at(row, type, i);
}

static inline uint16_t f32_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);                /* round to nearest even */
}
static inline uint16_t f32_to_f16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0));
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflows to infinity */
    if (magnitude < 0x38800000u) {                                    /* subnormal or zero */
        float scaled;
        memcpy(&scaled, &magnitude, 4);
        scaled = scaled * 16777216.0f; /* 2^24: the subnormal step becomes 1 */
        return (uint16_t)(sign | (uint16_t)__builtin_lrintf(scaled));
    }
    uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1); /* round to nearest even */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline long element_size(int type) { return type == W_F32 ? 4 : (type == W_I8 ? 1 : 2); }

/* out[index] = value, rounded to the float type of out (W_F32, W_F16 or W_BF16). */
static inline void store_as(void *out, int type, long index, float value) {
    switch (type) {
    case W_F16: ((uint16_t *)out)[index] = f32_to_f16(value); break;
    case W_BF16: ((uint16_t *)out)[index] = f32_to_bf16(value); break;
    default: ((float *)out)[index] = value;
    }
}

#endif
