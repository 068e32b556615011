/* What the kernels on AMX tiles share (amx.c: products and decode attention; prompt_attention.c):
 * tile configuration, bfloat16 roundings and splits, B-tile rows from pairs of rows, a 16 x 16
 * transpose. HAVE_AMX says whether this build has the instructions (-march=native on a CPU with
 * AMX-BF16 and AVX512-BF16); whether the kernel granted the tile state is starchat_amx_ready(). */
#ifndef STARCHAT_AMX_TILES_H
#define STARCHAT_AMX_TILES_H
#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#if HAVE_AMX
typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Every tile register as 16 rows of 64 bytes (palette 1), for this thread. The configuration is
 * a constant in memory: built on the stack, GCC 12 dropped the stores of its rows and widths when
 * this function was not inlined (it does not see _tile_loadconfig read all 64 bytes), and the
 * load faulted on the garbage left there. */
static const TileConfig tile_config = {
    .palette_id = 1,
    .bytes_per_row = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};
static inline void configure_tiles(void) { _tile_loadconfig(&tile_config); }

/* Row p of a B tile from two panel rows' float32 bits: for each column c, the bfloat16 (high
 * halves) of rows k0 + 2p (low word) and k0 + 2p + 1 (high word) side by side, one 32-bit lane per
 * column: a shift and a word blend, no shuffles. */
static inline __m512i pair_row(__m512i even, __m512i odd) {
    return _mm512_mask_blend_epi16(0x55555555u, odd, _mm512_srli_epi32(even, 16));
}

/* A float16 weight's float32 bits as high + low, two bfloat16 (in the high halves of the
 * returned lanes) whose sum is the weight exactly: high is it truncated to bfloat16, low the
 * remaining 3 bits of float16's 11-bit significand (exact in bfloat16, so truncation keeps it). */
static inline void split_f16_bits(__m512i bits, __m512i *high, __m512i *low) {
    *high = _mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u));
    *low = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(bits), _mm512_castsi512_ps(*high)));
}

/* C tile t (0-3; tile numbers are immediates) started from `start` (16 x 16 float32) or zeros,
 * and stored to dest, rows `stride` bytes apart. */
static inline void start_c_tile(int t, const float *start) {
    switch (t) {
    case 0: if (start) _tile_loadd(0, start, 64); else _tile_zero(0); break;
    case 1: if (start) _tile_loadd(1, start, 64); else _tile_zero(1); break;
    case 2: if (start) _tile_loadd(2, start, 64); else _tile_zero(2); break;
    default: if (start) _tile_loadd(3, start, 64); else _tile_zero(3); break;
    }
}
/* C tiles tmm0-3 all zero: four sums about to start. */
static inline void zero_c_tiles(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}
static inline void store_c_tile(int t, void *dest, long stride) {
    switch (t) {
    case 0: _tile_stored(0, dest, stride); break;
    case 1: _tile_stored(1, dest, stride); break;
    case 2: _tile_stored(2, dest, stride); break;
    default: _tile_stored(3, dest, stride); break;
    }
}

/* The 16 x 16 matrix of 32-bit values in rows[0..15], transposed in place. */
static inline void transpose_16x16(__m512i rows[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    /* b[4g + j] holds, in each 128-bit lane L, column 4L + j's entries of rows 4g .. 4g + 3 */
    for (int j = 0; j < 4; j++) {
        const __m512i r0 = b[j], r1 = b[4 + j], r2 = b[8 + j], r3 = b[12 + j];
        const __m512i t0 = _mm512_shuffle_i32x4(r0, r1, 0x44), t1 = _mm512_shuffle_i32x4(r0, r1, 0xEE);
        const __m512i t2 = _mm512_shuffle_i32x4(r2, r3, 0x44), t3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);
        rows[j] = _mm512_shuffle_i32x4(t0, t2, 0x88);
        rows[4 + j] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
        rows[8 + j] = _mm512_shuffle_i32x4(t1, t3, 0x88);
        rows[12 + j] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
    }
}

/* float32 lanes rounded to bfloat16 (nearest even), in the high half of each 32-bit lane. */
static inline __m512i round_to_bf16_bits(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    return _mm512_and_si512(_mm512_add_epi32(bits, rounding), _mm512_set1_epi32((int)0xFFFF0000u));
}

/* Two float32 rows of 16 (the high halves of their lanes holding bfloat16) as the 32 bfloat16 of
 * one tile row, in order. */
static inline __m512i pack_high_halves(__m512i first, __m512i second) {
    const __m512i odd_words = _mm512_setr_epi32(0x00030001, 0x00070005, 0x000b0009, 0x000f000d, 0x00130011, 0x00170015,
                                                0x001b0019, 0x001f001d, 0x00230021, 0x00270025, 0x002b0029, 0x002f002d,
                                                0x00330031, 0x00370035, 0x003b0039, 0x003f003d);
    return _mm512_permutex2var_epi16(first, odd_words, second);
}

/* float32 lanes as bfloat16 high halves (rounded to nearest) and what rounding left out (rounded
 * again): high + low keeps 16 bits of significand, and float16 or bfloat16 values exactly. */
static inline void lane_halves(__m512 v, __m512i *high, __m512i *low) {
    *high = round_to_bf16_bits(v);
    *low = round_to_bf16_bits(_mm512_sub_ps(v, _mm512_castsi512_ps(*high)));
}

/* 32 values of a float32 row (or of a float16 cache row) as bfloat16 high and low halves, each
 * one tile row. float16 values are exact as the two halves; float32 ones keep 16 bits. */
static inline void row_halves(__m512 first, __m512 second, int exact_split, __m512i *high, __m512i *low) {
    __m512i h0, h1, l0, l1;
    if (exact_split) {
        split_f16_bits(_mm512_castps_si512(first), &h0, &l0);
        split_f16_bits(_mm512_castps_si512(second), &h1, &l1);
    } else {
        lane_halves(first, &h0, &l0);
        lane_halves(second, &h1, &l1);
    }
    *high = pack_high_halves(h0, h1);
    *low = pack_high_halves(l0, l1);
}

/* C tile t += A(a) B(b) for a tile number t (0-3) known only at run time. */
#define DP_INTO(t, a, b)                              \
    switch (t) {                                      \
    case 0: _tile_dpbf16ps(0, a, b); break;           \
    case 1: _tile_dpbf16ps(1, a, b); break;           \
    case 2: _tile_dpbf16ps(2, a, b); break;           \
    default: _tile_dpbf16ps(3, a, b); break;          \
    }

#endif /* HAVE_AMX */
#endif
