/* Products on AMX tiles straight from the packed panels (linear.c's layout), for bfloat16, int8 and
 * float16 weights on CPUs with AMX-BF16 (Intel Xeon since Sapphire Rapids).
 *
 * Decode steps of tens of sequences were the gap: the native tiles are bound by FMAs there
 * (2.1 ms for one tiny_starcoder layer's products at 32 rows), oneDNN's AMX product needs plain
 * weight rows (unpacking them per call cost as much as the product saved), and keeping a second,
 * unpacked copy would double the model's memory. Here each panel is turned into AMX's B-tile
 * layout (pairs of K interleaved per column) 32 rows of K at a time as it streams by (kept for
 * later passes of rows where there are some: starchat_amx_columns): the tiles multiply while the
 * weights are read once.
 *
 * The activations are rounded to bfloat16 (as oneDNN's AMX products round them on the prefill
 * path, and as HF's bfloat16 models round every product's input); sums, scales and bias stay
 * float32. int8 weights multiply on AMX-INT8 tiles instead where the CPU has them and the rows
 * fit (int8_columns: the activations quantized per row to 15 bits, finer than bfloat16).
 *
 * float16 weights have no AMX product on these CPUs (AMX-FP16 came later), and rounding
 * them to bfloat16 would drop 3 bits of each: each is split into two bfloat16 halves that sum to it
 * exactly, each activation into two that keep 16 bits of its significand, and three tile products
 * (high x high, high x low, low x high; low x low, about 2^-17 of a term, is left out) give a
 * product about 2^-16 of each term from exact: more precise than one in float16 (2^-11).
 *
 * Used from `amx_min_rows` rows up where the caller asks (Output.amx_min_rows), after
 * starchat_amx_init() was granted the tile state by the kernel.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "int8_rows.h"
#include "kernels.h"
#include "vector_math.h"

#if HAVE_AMX
static int amx_granted = 0;

/* Tile registers: C tiles tmm0-3 (four blocks of 16 rows per pass over a panel), A in tmm4, B in
 * tmm5; with float16 weights also B's low half in tmm6 and A's in tmm7. */
#define ROW_BLOCKS_PER_PASS 4
/* With more than one pass of row blocks, or rows too long to stay in L2, panels go in groups of
 * this many (see starchat_amx_columns). */
#define PANELS_PER_GROUP 4
/* A pass's activation rows (bfloat16, both halves for float16) above this many bytes are taken
 * K_STEPS steps of K (32 each; K_STEPS_SPLIT for float16, whose two halves take twice the room)
 * at a time across the group's panels, so each step's tiles come from L1 for all four. */
#define K_BLOCK_FROM (1L << 20)
#define K_STEPS 4
#define K_STEPS_SPLIT 2
/* Such long rows go a step of K_STEPS at a time over all row blocks and this many panels: the
 * group's tiles of that step of K stay in cache for every pass of rows, and the rows (25 MB for
 * StarChat-beta's c_proj at 512) are read once per group (see starchat_amx_columns). */
#define LONG_ROW_PANELS 16
/* All rows' bytes from which wide products go that way too: StarChat-beta's 6,144-wide c_attn and
 * c_fc at 512 rows (6 MiB of rows, read once per group of 4 of 400 / 1,536 panels) x1.13-1.22. */
#define ALL_ROWS_FROM (4L << 20)
/* A group's kept B tiles beyond this many bytes (per thread) are rebuilt per pass instead: they
 * would come from beyond L2 either way, and StarChat-beta's float16 mlp.c_proj would keep 6 MiB
 * per thread (512 rows: 32.9 against 35.9 ms rebuilt; its bfloat16 tiles, 3 MiB, stay kept:
 * 12.0 against 13.0). */
#define KEPT_TILES_MAX (4L << 20)

/* Panel row j (PANEL weights) as float32 bits, zeros past the last row of K. Each value's high
 * half is its bfloat16: exact for bfloat16 and int8 weights (int8 is exact in float32, and its
 * float32 has no bits past the 8th of its significand). */
static inline __m512i panel_row_bits(const void *panel, int wtype, long j, long k) {
    if (j >= k) return _mm512_setzero_si512();
    if (wtype == W_BF16)
        return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + j * PANEL))), 16);
    if (wtype == W_F16)
        return _mm512_castps_si512(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + j * PANEL))));
    return _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)panel + j * PANEL)))));
}

/* The B tile of rows k0 .. k0 + 31 of a bfloat16 or int8 panel. */
static inline void b_tile(const void *panel, int wtype, long k, long k0, uint16_t tile[16 * 32]) {
    const long row_bytes = PANEL * element_size(wtype);
    if (wtype == W_BF16 && k0 + 32 <= k) {
        /* Rows k0 + 2p and k0 + 2p + 1 are 64 contiguous bytes of the panel: one load and one word
         * permutation give the tile row (column c's two values side by side), where widening both
         * rows to float32 and blending them took six vector operations (tiny_starcoder's four
         * products at 32 rows 0.49 against 0.59 ms, 64 rows 0.60 against 0.75 on the 2-core Xeon).
         * int8 panels widen as before: through float32 and bfloat16 pairs it measured no faster. */
        const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                    23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const uint16_t *rows = (const uint16_t *)panel + k0 * PANEL;
        for (int p = 0; p < 16; p++) {
            _mm_prefetch((const char *)(rows + (2 * p + 64) * PANEL), _MM_HINT_T0); /* 2 KiB ahead */
            _mm512_store_si512((__m512i *)(tile + 32 * p),
                               _mm512_permutexvar_epi16(interleave, _mm512_loadu_si512((const void *)(rows + 2 * p * PANEL))));
        }
        return;
    }
    for (int p = 0; p < 16; p++) {
        _mm_prefetch((const char *)panel + (k0 + 2 * p + 64) * row_bytes, _MM_HINT_T0); /* 2 KiB ahead (bf16) */
        _mm512_store_si512((__m512i *)(tile + 32 * p),
                           pair_row(panel_row_bits(panel, wtype, k0 + 2 * p, k), panel_row_bits(panel, wtype, k0 + 2 * p + 1, k)));
    }
}

/* The two B tiles (high and low halves, exact together) of rows k0 .. k0 + 31 of a float16 panel. */
static inline void b_tiles_f16(const void *panel, long k, long k0, uint16_t high[16 * 32], uint16_t low[16 * 32]) {
    for (int p = 0; p < 16; p++) {
        _mm_prefetch((const char *)panel + (k0 + 2 * p + 64) * PANEL * 2, _MM_HINT_T0);
        __m512i even_high, even_low, odd_high, odd_low;
        split_f16_bits(panel_row_bits(panel, W_F16, k0 + 2 * p, k), &even_high, &even_low);
        split_f16_bits(panel_row_bits(panel, W_F16, k0 + 2 * p + 1, k), &odd_high, &odd_low);
        _mm512_store_si512((__m512i *)(high + 32 * p), pair_row(even_high, odd_high));
        _mm512_store_si512((__m512i *)(low + 32 * p), pair_row(even_low, odd_low));
    }
}

/* Activation rows are kept in A tiles' order: the 16 rows x 32 values of each row block and step
 * of K contiguous (1 KiB), the steps of a block one after another, so every tile load reads one
 * piece of memory rather than 16 lines kilobytes apart (measured level with row-major rows on the
 * 2-core Xeon, where the loads come from L1 or L2 either way). Value j of a row is at this offset
 * from the row's first value (row r's: (r / 16) * 16 * k_padded + (r % 16) * 32). */
static inline long tile_offset(long j) { return j / 32 * 512 + j % 32; }

/* Activation row (k float32) as bfloat16 in tile order, zero-padded to k_padded; with `low`,
 * also what rounding left out, as a second bfloat16 row (together 16 bits of significand: more
 * than float16's 11). x NULL: a padding row of zeros. */
static inline void row_to_bf16(const float *x, long k, long k_padded, uint16_t *out, uint16_t *low) {
    long j = 0;
    if (x)
        for (; j + 16 <= k; j += 16) { /* 16 values never straddle two steps of 32 */
            const __m512 v = _mm512_loadu_ps(x + j);
            const __m256bh rounded = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256((__m256i *)(out + tile_offset(j)), (__m256i)rounded);
            if (low) _mm256_storeu_si256((__m256i *)(low + tile_offset(j)), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, _mm512_cvtpbh_ps(rounded))));
        }
    for (; j < k_padded; j++) {
        const uint16_t value = x && j < k ? f32_to_bf16(x[j]) : 0;
        out[tile_offset(j)] = value;
        if (low) low[tile_offset(j)] = x && j < k ? f32_to_bf16(x[j] - bf16_to_f32(value)) : 0;
    }
}

/* One row block's share of a step of K: C tile t += A(t) B, and with split (float16 weights)
 * += A(t) B_low + A_low(t) B. Tile numbers are immediates, hence a macro. */
#define MULTIPLY_ROW_BLOCK(t)                                                   \
    if (count > t) {                                                            \
        _tile_loadd(4, a + t * 16 * k_padded + k0 * 16, 64);                    \
        _tile_dpbf16ps(t, 4, 5);                                                \
        if (split) {                                                            \
            _tile_dpbf16ps(t, 4, 6);                                            \
            _tile_loadd(7, a_low + t * 16 * k_padded + k0 * 16, 64);            \
            _tile_dpbf16ps(t, 7, 5);                                            \
        }                                                                       \
    }

/* A C tile's start for columns n0 .. n0 + columns - 1: the bias in every row (in c), or NULL
 * (zeros) where there is none or int8 scales are still to be applied to the sums. */
static inline const float *bias_start(const Output *out, long n0, long columns, float (*c)[PANEL]) {
    if (!out->bias || out->scales) return NULL;
    for (long r = 0; r < 16; r++)
        for (long col = 0; col < PANEL; col++) c[r][col] = col < columns ? out->bias[n0 + col] : 0.0f;
    return &c[0][0];
}

/* C tile `tile`'s finished sums (rows row0 .., columns n0 ..) into the output: a full float32
 * tile straight into the output rows, else through c and store_tile_rows, which applies what
 * the tile did not start from (bias_start). */
static inline void finish_c_tile(int tile, const Output *out, long m, long row0, long n0, long columns, float (*c)[PANEL]) {
    if (out->type == W_F32 && !out->scales && columns == PANEL && row0 + 16 <= m) {
        float *rows = (float *)out->data + row0 * out->n_total + n0;
        if (out->activation == ACTIVATION_NONE) {
            store_c_tile(tile, rows, out->n_total * (long)sizeof(float));
            return;
        }
        /* The GELU on the tile's contiguous copy, then one store a row: read back from the
         * output rows (12 KiB apart in an MLP's up projection, so all 16 in one set of L1) it
         * cost c_fc at 512 rows 0.34-0.43 ms of 1.9 where this costs 0.10-0.14. */
        store_c_tile(tile, c, 64);
        for (int r = 0; r < 16; r++) _mm512_storeu_ps(rows + r * out->n_total, gelu_tanh16(_mm512_load_ps(c[r])));
        return;
    }
    Output rest = *out;
    if (out->bias && !out->scales) rest.bias = NULL; /* already in the sums */
    store_c_tile(tile, c, 64);
    store_tile_rows(&rest, row0, (int)(m - row0 < 16 ? m - row0 : 16), n0, columns, c);
}

/* Part of one panel's product with up to four row blocks (rows of a and a_low from `first` blocks
 * on): steps k_begin .. k_end of K. The C tiles start from `partial` (the sums of the steps before,
 * 16 x 16 float32 per row block) or, at k_begin 0, from the bias or zeros; at k_end == k_padded
 * they go to the output, else back to `partial`. The panel's B tiles are built as its rows stream
 * by, into tiles (one step of K: 512 uint16 each, high then low halves for float16); with `cached`
 * they stay there for the panel's later passes (tiles holds the steps of K from tiles_from on) and
 * only the first pass builds them. Inlined with split a constant: one loop per weight kind.
 *
 * Finishing the sums row by row (store_tile_rows) cost a third of a 512 x 768 x 3,072 product, so
 * where it can the tile is the output: sums start from the bias (no int8 scales to apply after
 * it) and full float32 tiles are stored straight into the output rows. */
static inline __attribute__((always_inline)) void panel_steps(const char *panel, int wtype, int split, long k, long k_padded,
                                                             long k_begin, long k_end, const uint16_t *a, const uint16_t *a_low,
                                                             long count, uint16_t *tiles, long tiles_from, int cached,
                                                             float (*partial)[16][PANEL],
                                                             float (*c)[PANEL], const Output *out, long m, long first, long n0,
                                                             long columns) {
    const long tile_values = (split ? 2 : 1) * 512;
    if (k_begin == 0) {
        const float *start = bias_start(out, n0, columns, c);
        for (int t = 0; t < count; t++) start_c_tile(t, start);
    } else {
        for (int t = 0; t < count; t++) start_c_tile(t, &partial[t][0][0]);
    }
    /* The B tiles of a step are built one step ahead of their products (uncached: in alternate
     * halves of `tiles`): a tile load right after the stores that wrote its bytes waits for them
     * to reach the cache. */
#define STEP_TILES(k0) (cached ? tiles + ((k0) - tiles_from) / 32 * tile_values : tiles + ((k0) / 32 & 1) * tile_values)
#define BUILD_TILES(k0)                                                                       \
    do {                                                                                      \
        if (split)                                                                            \
            b_tiles_f16(panel, k, (k0), STEP_TILES(k0), STEP_TILES(k0) + 512);                \
        else                                                                                  \
            b_tile(panel, wtype, k, (k0), STEP_TILES(k0));                                    \
    } while (0)
    const int build = !cached || first == 0;
    if (build) BUILD_TILES(k_begin);
    for (long k0 = k_begin; k0 < k_end; k0 += 32) {
        uint16_t *b = STEP_TILES(k0);
        if (build && k0 + 32 < k_end) BUILD_TILES(k0 + 32);
        if (split) _tile_loadd(6, b + 512, 64);
        _tile_loadd(5, b, 64);
        MULTIPLY_ROW_BLOCK(0)
        MULTIPLY_ROW_BLOCK(1)
        MULTIPLY_ROW_BLOCK(2)
        MULTIPLY_ROW_BLOCK(3)
    }
#undef BUILD_TILES
#undef STEP_TILES
    if (k_end < k_padded) {
        for (int t = 0; t < count; t++) store_c_tile(t, &partial[t][0][0], 64);
        return;
    }
    for (int t = 0; t < count; t++) finish_c_tile(t, out, m, (first + t) * 16, n0, columns, c);
}

/* Two neighbouring panels' products (bfloat16 or int8 weights) with up to two row blocks (from
 * block `first` on) over the whole of K: the decode steps of up to 32 sequences, and every 2 x 2
 * block of a pass of more rows (see starchat_amx_columns). Each step of K loads its
 * activation tiles once for both panels (C tiles: row block t of panel q in tmm(t + 2q); A in tmm4
 * and tmm6, B in tmm5 and tmm7), where panel by panel loaded them once per panel: streaming all
 * of tiny_starcoder's products at 32 rows took 14.4 ms without the activation tile loads
 * against 17.8 with them, and the same with or without the tile products themselves, so those
 * loads (from L2, 1 KiB each) were what held the weights' stream below the memory's rate. The
 * B tiles of both panels are built one step ahead (as in panel_steps), in alternate halves of
 * tiles (2 x 2 x 512 values), or with `kept`, into kept (both panels' tiles of every step of K,
 * step by step from step tiles_from on) where `build`, else read from there. The second panel may
 * be the last, narrower one. Steps k_begin .. k_end of K: from k_begin 0 the C tiles start from the
 * bias (or zeros), else from `partial` (row block t of panel q at partial[q * partial_stride + t]),
 * where they go back unless k_end is the end of K (long rows' steps of K). */
static inline __attribute__((always_inline)) void panel_pair_steps(const char *panel, long panel_bytes, int wtype, long k,
                                                                  long k_padded, long k_begin, long k_end, const uint16_t *a,
                                                                  long first, long count, uint16_t *tiles, uint16_t *kept,
                                                                  long tiles_from, int build, float (*partial)[16][PANEL],
                                                                  long partial_stride, float (*c)[PANEL], const Output *out,
                                                                  long m, long n0, long second_columns) {
    a += first * 16 * k_padded;
    if (k_begin == 0) {
        const float *start = bias_start(out, n0, PANEL, c);
        start_c_tile(0, start);
        if (count > 1) start_c_tile(1, start);
        start = bias_start(out, n0 + PANEL, second_columns, c); /* c is free again: the tiles above are loaded */
        start_c_tile(2, start);
        if (count > 1) start_c_tile(3, start);
    } else {
        start_c_tile(0, &partial[0][0][0]);
        if (count > 1) start_c_tile(1, &partial[1][0][0]);
        start_c_tile(2, &partial[partial_stride][0][0]);
        if (count > 1) start_c_tile(3, &partial[partial_stride + 1][0][0]);
    }
#define PAIR_TILES(k0) (kept ? kept + ((k0) - tiles_from) / 32 * 1024 : tiles + ((k0) / 32 & 1) * 1024)
    if (build) {
        b_tile(panel, wtype, k, k_begin, PAIR_TILES(k_begin));
        b_tile(panel + panel_bytes, wtype, k, k_begin, PAIR_TILES(k_begin) + 512);
    }
    for (long k0 = k_begin; k0 < k_end; k0 += 32) {
        const uint16_t *b = PAIR_TILES(k0);
        if (build && k0 + 32 < k_end) {
            b_tile(panel, wtype, k, k0 + 32, PAIR_TILES(k0 + 32));
            b_tile(panel + panel_bytes, wtype, k, k0 + 32, PAIR_TILES(k0 + 32) + 512);
        }
        _tile_loadd(5, b, 64);
        _tile_loadd(7, b + 512, 64);
        _tile_loadd(4, a + k0 * 16, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(2, 4, 7);
        if (count > 1) {
            _tile_loadd(6, a + 16 * k_padded + k0 * 16, 64);
            _tile_dpbf16ps(1, 6, 5);
            _tile_dpbf16ps(3, 6, 7);
        }
    }
#undef PAIR_TILES
    if (k_end < k_padded) {
        for (int t = 0; t < count; t++) {
            store_c_tile(t, &partial[t][0][0], 64);
            store_c_tile(2 + t, &partial[partial_stride + t][0][0], 64);
        }
        return;
    }
    for (int t = 0; t < count; t++) {
        finish_c_tile(t, out, m, (first + t) * 16, n0, PANEL, c);
        finish_c_tile(2 + t, out, m, (first + t) * 16, n0 + PANEL, second_columns, c);
    }
}

/* ---- int8 weights on AMX-INT8 tiles ------------------------------------------------------------ */
#if defined(__AMX_INT8__) && defined(__AVX512VBMI__)
#define HAVE_AMX_INT8 1
/* int8 weights multiply as int8 (tdpbssd) against activations quantized per row to 15 bits, in
 * two int8 parts (int8_rows.h: finer than rounding them to bfloat16, the bfloat16 tiles' way);
 * the sums are exact integers until the float32 finish.
 *
 * Why: on bfloat16 tiles every int8 B tile had to be widened to bfloat16 (two conversions per
 * 16 values), and that, not the memory, bounded decode steps of 16-64 sequences (tiny_starcoder's
 * products streamed at 32 rows in 13.9 ms against 7.1 for one row). An AMX-INT8 B tile is the
 * panel's own bytes, four rows of K per column: one 64-byte load and one byte permutation per
 * tile row, for 64 values of K where bfloat16 tiles take 32. hi and lo take a tile product each,
 * as many per step of K as bfloat16 tiles do. */
/* Every row block reads its activations once per pair of panels: up to this many bytes of them
 * (hi and lo) stay in L2 across the pairs. */
#define INT8_ROWS_MAX_BYTES (1L << 20)

/* The B tile of panel rows k0 .. k0 + 63 (int8, PANEL bytes a row): row p holds, for each column c,
 * rows k0 + 4p .. k0 + 4p + 3 side by side. Rows past K are zeros (masked loads: the last panel's
 * bytes end there). */
static inline void int8_b_tile(const int8_t *panel, long k, long k0, int8_t tile[1024]) {
    for (int p = 0; p < 16; p++) {
        const long row = k0 + 4 * p;
        _mm_prefetch((const char *)(panel + row * PANEL) + 2048, _MM_HINT_T0); /* 2 KiB ahead */
        _mm512_store_si512((__m512i *)(tile + 64 * p), four_rows_by_column(four_panel_rows(panel, k, row)));
    }
}

/* The finished sums of row block `block` for the panel of columns n0 ..: C tiles hi (sums[0]) and
 * lo (sums[1]) as (128 hi + lo) s per row, then the weights' scales and the bias into the output
 * (store_tile_rows: a vector a row, where per-value loops had cost about 2 ms of tiny_starcoder's
 * products streamed at 32 rows). */
static inline void finish_int8_tiles(const int32_t (*sums)[16][16], const float *row_scales, const Output *out, long m,
                                     long block, long n0, long columns, float (*c)[PANEL]) {
    const long row0 = block * 16;
    const int rows = (int)(m - row0 < 16 ? m - row0 : 16);
    for (int r = 0; r < rows; r++) {
        const __m512 high = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)sums[0][r]));
        const __m512 low = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)sums[1][r]));
        _mm512_store_ps(c[r], _mm512_mul_ps(_mm512_fmadd_ps(high, _mm512_set1_ps(128.0f), low), _mm512_set1_ps(row_scales[row0 + r])));
    }
    store_tile_rows(out, row0, rows, n0, columns, c);
}

/* The whole product for int8 weights (see above): panels two at a time, each pair's B tiles built
 * while its first row block multiplies and kept (per thread: 2 KiB per 64 rows of K) for its other
 * row blocks. Tiles: C hi / lo of the first panel in tmm0 / tmm1, of the second in tmm2 / tmm3;
 * A hi / lo in tmm4 / tmm5; B of the two panels in tmm6 / tmm7. */
static int int8_columns(const float *x, long m, const int8_t *w, const Output *out, long n, long k) {
    const long k_padded = (k + 63) / 64 * 64, steps = k_padded / 64, row_blocks = (m + 15) / 16, padded_rows = row_blocks * 16;
    int8_t *rows = NULL;
#pragma omp single copyprivate(rows)
    rows = (int8_t *)aligned_alloc(64, (size_t)(2 * padded_rows * k_padded + padded_rows * (long)sizeof(float) + 63) / 64 * 64);
    if (!rows) return 0;
    int8_t *rows_low = rows + padded_rows * k_padded;
    float *row_scales = (float *)(rows_low + padded_rows * k_padded);
#pragma omp for schedule(static)
    for (long r = 0; r < padded_rows; r++) {
        const long at = r / 16 * 16 * k_padded + r % 16 * 64;
        quantize_row_15_bits(r < m ? x + r * k : NULL, k, k_padded, 1024, rows + at, rows_low + at, &row_scales[r]);
    }
    configure_tiles();
    const long blocks = (n + PANEL - 1) / PANEL, pairs = (blocks + 1) / 2, panel_bytes = k * PANEL;
    int8_t *kept = row_blocks > 1 ? (int8_t *)aligned_alloc(64, (size_t)(2 * steps * 1024)) : NULL;
    int8_t step_tiles[2 * 2 * 1024] __attribute__((aligned(64))); /* without `kept`: two steps' tiles, built one ahead */
    int32_t sums[4][16][16] __attribute__((aligned(64)));
    float c[16][PANEL] __attribute__((aligned(64)));
#pragma omp for schedule(static) nowait
    for (long pair = 0; pair < pairs; pair++) {
        const long first_block = 2 * pair;
        const int two = first_block + 1 < blocks;
        const int8_t *panel = w + first_block * panel_bytes;
        for (long block = 0; block < row_blocks; block++) {
            const int build = block == 0 || !kept;
#define STEP_TILES(s) (kept ? kept + (s) * 2048 : step_tiles + ((s) & 1) * 2048)
#define BUILD_STEP(s)                                                                      \
    do {                                                                                   \
        int8_b_tile(panel, k, (s) * 64, STEP_TILES(s));                                    \
        if (two) int8_b_tile(panel + panel_bytes, k, (s) * 64, STEP_TILES(s) + 1024);      \
    } while (0)
            zero_c_tiles();
            if (build) BUILD_STEP(0);
            const int8_t *a_hi = rows + block * 16 * k_padded, *a_lo = rows_low + block * 16 * k_padded;
            for (long s = 0; s < steps; s++) {
                if (build && s + 1 < steps) BUILD_STEP(s + 1); /* a tile load right after the stores that wrote it waits */
                const int8_t *b = STEP_TILES(s);
                _tile_loadd(6, b, 64);
                _tile_loadd(4, a_hi + s * 1024, 64);
                _tile_loadd(5, a_lo + s * 1024, 64);
                _tile_dpbssd(0, 4, 6);
                _tile_dpbssd(1, 5, 6);
                if (two) {
                    _tile_loadd(7, b + 1024, 64);
                    _tile_dpbssd(2, 4, 7);
                    _tile_dpbssd(3, 5, 7);
                }
            }
#undef BUILD_STEP
#undef STEP_TILES
            _tile_stored(0, sums[0], 64);
            _tile_stored(1, sums[1], 64);
            const long n0 = first_block * PANEL;
            finish_int8_tiles((const int32_t (*)[16][16])sums, row_scales, out, m, block, n0, n - n0 < PANEL ? n - n0 : PANEL, c);
            if (two) {
                _tile_stored(2, sums[2], 64);
                _tile_stored(3, sums[3], 64);
                const long n1 = n0 + PANEL;
                finish_int8_tiles((const int32_t (*)[16][16])(sums + 2), row_scales, out, m, block, n1, n - n1 < PANEL ? n - n1 : PANEL, c);
            }
        }
    }
    _tile_release();
    free(kept);
#pragma omp barrier
#pragma omp single
    free(rows);
    return 1;
}
#else
#define HAVE_AMX_INT8 0
#endif

/* ---- Decode attention over a 16-bit cache (decode_attention.c's items) ---------------------- */

/* The cache rows of a sequence sit in 16-token blocks anywhere in the cache, which the hardware's
 * prefetchers do not follow: keys are asked for this many blocks ahead of their tile loads, and
 * each block's values into L2 while its keys are scored (the value products come after the
 * softmax). When added: a decode step of 32 sequences of 300 tokens x1.06, 16 of 2,000 x1.11
 * (tiny_starcoder, bfloat16; the values' share the most of it). */
#define ATTENTION_PREFETCH_BLOCKS 2

/* Whether slots[0 .. 16) are 16 consecutive cache rows. */
static inline int consecutive_slots(const int64_t *slots) {
    const __m512i base = _mm512_set1_epi64(slots[0]);
    const __mmask8 low = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512((const void *)slots),
                                                 _mm512_add_epi64(base, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)));
    const __mmask8 high = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512((const void *)(slots + 8)),
                                                  _mm512_add_epi64(base, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15)));
    return low == 0xFF && high == 0xFF;
}

/* Cache row l's 16 values from column `column` as float32 bits (zeros for a masked or absent row). */
static inline __m512i cache_bits(const uint16_t *cache, int split, const int64_t *slots, const float *mask, long max_len,
                                 long l, long kv_dim, long column) {
    if (l >= max_len || (isinf(mask[l]) && mask[l] < 0)) return _mm512_setzero_si512();
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(cache + slots[l] * kv_dim + column));
    return split ? _mm512_castps_si512(_mm512_cvtph_ps(raw)) : _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
}

/* The attention of `heads` (at most 16) query heads over one KV head's cached rows, bfloat16 or
 * (split) float16 cache. With a float16 cache every product is split as the float16 products
 * are (header comment): keys and values as two exact bfloat16 halves, queries and softmax
 * weights as two halves keeping 16 bits, three tile products each. Tiles: C in tmm0 (scores) or
 * tmm0-3 (outputs), A high / low in tmm4 / tmm6, B high / low in tmm5 / tmm7. stats (not NULL):
 * the outputs are left unnormalised and head h's maximum score and sum of weights go to
 * stats[2h], stats[2h + 1] (a part of the keys, merged with the others by the caller). */
static int attention_item(const float *q, int heads, const uint16_t *keys, const uint16_t *values, int split, long kv_dim,
                          long offset, const int64_t *slots, const float *mask, long max_len, int head_dim, float scale,
                          float *out, float *stats, float *scratch) {
    if (!amx_granted || heads < 1 || heads > 16 || head_dim % 32 || head_dim > 256) return 0;
    const long blocks = (max_len + 31) / 32 * 2; /* 16-key blocks, an even number (PV takes 32 keys a step) */
    const int dim_steps = head_dim / 32;
    /* scratch: scores (blocks x 16 keys x 16 heads, float32), then uint16 tiles: P high and low
     * (blocks / 2 each), Q high and low (dim_steps each), two staging tiles, four value tiles */
    float *scores = scratch;
    uint16_t *p_high = (uint16_t *)(scores + blocks * 256), *p_low = p_high + blocks / 2 * 512;
    uint16_t *q_high = p_low + blocks / 2 * 512, *q_low = q_high + dim_steps * 512;
    uint16_t *staging = q_low + dim_steps * 512, *staging_low = staging + 512;
    configure_tiles();
    /* Q^T as B tiles: row p, column h = head h's dimensions 2p, 2p + 1 of the step. */
    for (int step = 0; step < dim_steps; step++) {
        __m512i high[16], low[16];
        for (int h = 0; h < 16; h++) {
            if (h < heads) {
                const float *row = q + (long)h * head_dim + step * 32;
                row_halves(_mm512_loadu_ps(row), _mm512_loadu_ps(row + 16), 0, &high[h], &low[h]);
            } else {
                high[h] = low[h] = _mm512_setzero_si512();
            }
        }
        transpose_16x16(high);
        if (split) transpose_16x16(low); /* a bfloat16 cache takes the high halves only */
        for (int p = 0; p < 16; p++) {
            _mm512_storeu_si512((__m512i *)(q_high + step * 512 + 32 * p), high[p]);
            if (split) _mm512_storeu_si512((__m512i *)(q_low + step * 512 + 32 * p), low[p]);
        }
    }
    /* S^T = K Q^T, 16 keys at a time: keys as A tiles, in place or staged (masked or absent rows
     * zero). */
    for (long block = 0; block < blocks; block++) {
        for (int i = 0; i < 16; i++) {
            const long ahead = (block + ATTENTION_PREFETCH_BLOCKS) * 16 + i, now = block * 16 + i;
            for (int line = 0; line < head_dim * 2; line += 64) {
                if (ahead < max_len) _mm_prefetch((const char *)(keys + slots[ahead] * kv_dim + offset) + line, _MM_HINT_T0);
                if (now < max_len) _mm_prefetch((const char *)(values + slots[now] * kv_dim + offset) + line, _MM_HINT_T1);
            }
        }
        _tile_zero(0);
        /* A bfloat16 block of 16 keys, all used, in 16 consecutive cache rows (a cache block: the
         * usual case) is its own A tile, loaded from the cache with the rows' stride. */
        const long first = block * 16;
        const int in_place = !split && first + 16 <= max_len && consecutive_slots(slots + first) &&
                             !_mm512_cmp_ps_mask(_mm512_loadu_ps(mask + first), _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
        for (int step = 0; step < dim_steps; step++) {
            if (in_place) {
                _tile_loadd(4, keys + slots[first] * kv_dim + offset + step * 32, kv_dim * 2);
                _tile_loadd(5, q_high + step * 512, 64);
                _tile_dpbf16ps(0, 4, 5);
                continue;
            }
            for (int i = 0; i < 16; i++) {
                const long l = block * 16 + i, column = offset + step * 32;
                if (split) {
                    __m512i high, low;
                    row_halves(_mm512_castsi512_ps(cache_bits(keys, 1, slots, mask, max_len, l, kv_dim, column)),
                               _mm512_castsi512_ps(cache_bits(keys, 1, slots, mask, max_len, l, kv_dim, column + 16)), 1,
                               &high, &low);
                    _mm512_storeu_si512((__m512i *)(staging + 32 * i), high);
                    _mm512_storeu_si512((__m512i *)(staging_low + 32 * i), low);
                } else {
                    __m512i row = _mm512_setzero_si512();
                    if (l < max_len && !(isinf(mask[l]) && mask[l] < 0))
                        row = _mm512_loadu_si512((const void *)(keys + slots[l] * kv_dim + column));
                    _mm512_storeu_si512((__m512i *)(staging + 32 * i), row);
                }
            }
            _tile_loadd(4, staging, 64);
            _tile_loadd(5, q_high + step * 512, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (split) {
                _tile_loadd(6, staging_low, 64);
                _tile_loadd(7, q_low + step * 512, 64);
                _tile_dpbf16ps(0, 4, 7);
                _tile_dpbf16ps(0, 6, 5);
            }
        }
        _tile_stored(0, scores + block * 256, 64);
    }
    /* Softmax over the keys, 16 heads a vector: scaled, masked, minus the maximum, exponentiated. */
    __m512 best = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (long l = 0; l < blocks * 16; l++) {
        const float bias = l < max_len ? mask[l] : -INFINITY;
        const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(scores + l * 16), _mm512_set1_ps(scale), _mm512_set1_ps(bias));
        _mm512_storeu_ps(scores + l * 16, v);
        best = _mm512_max_ps(best, v);
    }
    const __mmask16 empty = _mm512_cmp_ps_mask(best, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ); /* every key masked */
    for (long l = 0; l < blocks * 16; l++) {
        const __m512 w = _mm512_maskz_mov_ps((__mmask16)~empty, exp_negative16(_mm512_sub_ps(_mm512_loadu_ps(scores + l * 16), best)));
        _mm512_storeu_ps(scores + l * 16, w);
        total = _mm512_add_ps(total, w);
    }
    /* P as A tiles (16 heads x 32 keys): key pairs interleaved per head, transposed. */
    for (long pair_block = 0; pair_block < blocks / 2; pair_block++) {
        __m512i high[16], low[16];
        for (int p = 0; p < 16; p++) {
            const __m512 even = _mm512_loadu_ps(scores + (pair_block * 32 + 2 * p) * 16), odd = _mm512_loadu_ps(scores + (pair_block * 32 + 2 * p + 1) * 16);
            const __m512i even_high = round_to_bf16_bits(even), odd_high = round_to_bf16_bits(odd);
            high[p] = pair_row(even_high, odd_high);
            if (split)
                low[p] = pair_row(round_to_bf16_bits(_mm512_sub_ps(even, _mm512_castsi512_ps(even_high))),
                                  round_to_bf16_bits(_mm512_sub_ps(odd, _mm512_castsi512_ps(odd_high))));
        }
        transpose_16x16(high);
        if (split) transpose_16x16(low);
        for (int h = 0; h < 16; h++) {
            _mm512_storeu_si512((__m512i *)(p_high + pair_block * 512 + 32 * h), high[h]);
            if (split) _mm512_storeu_si512((__m512i *)(p_low + pair_block * 512 + 32 * h), low[h]);
        }
    }
    /* O = P V, 64 dimensions (four C tiles) at a time; V's B tiles built from pairs of key rows.
     * Over a bfloat16 cache each pair of rows gives its B tiles' rows by word interleaves, 32
     * dimensions at a time: the low and high interleave of a 128-bit lane hold dimensions
     * 8k .. 8k + 3 and 8k + 4 .. 8k + 7, so C tile column c of those tiles is dimension
     * column_dim(tile, c), put back in place when the outputs are stored. */
    uint16_t *value_tiles = staging_low + 512; /* four B tiles (bfloat16 cache) */
    float inverse[16];
    _mm512_storeu_ps(inverse, stats ? _mm512_set1_ps(1.0f) : _mm512_maskz_div_ps((__mmask16)~empty, _mm512_set1_ps(1.0f), total));
    if (stats) {
        float maxima[16], totals[16];
        _mm512_storeu_ps(maxima, best), _mm512_storeu_ps(totals, total);
        for (int h = 0; h < heads; h++) stats[2 * h] = maxima[h], stats[2 * h + 1] = totals[h];
    }
    float tile[16][16] __attribute__((aligned(64)));
    for (int d0 = 0; d0 < head_dim; d0 += 64) {
        const int tiles = (head_dim - d0) / 16 < 4 ? (head_dim - d0) / 16 : 4;
        zero_c_tiles();
        for (long pair_block = 0; pair_block < blocks / 2; pair_block++) {
            _tile_loadd(4, p_high + pair_block * 512, 64);
            if (split) _tile_loadd(6, p_low + pair_block * 512, 64);
            if (!split) {
                for (int p = 0; p < 16; p++) {
                    const long l = pair_block * 32 + 2 * p;
                    const int even_used = l < max_len && !(isinf(mask[l]) && mask[l] < 0);
                    const int odd_used = l + 1 < max_len && !(isinf(mask[l + 1]) && mask[l + 1] < 0);
                    for (int chunk = 0; chunk < tiles / 2; chunk++) {
                        const long column = offset + d0 + 32 * chunk;
                        const __m512i even = even_used ? _mm512_loadu_si512((const void *)(values + slots[l] * kv_dim + column))
                                                       : _mm512_setzero_si512();
                        const __m512i odd = odd_used ? _mm512_loadu_si512((const void *)(values + slots[l + 1] * kv_dim + column))
                                                     : _mm512_setzero_si512();
                        _mm512_storeu_si512((__m512i *)(value_tiles + (2 * chunk) * 512 + 32 * p), _mm512_unpacklo_epi16(even, odd));
                        _mm512_storeu_si512((__m512i *)(value_tiles + (2 * chunk + 1) * 512 + 32 * p), _mm512_unpackhi_epi16(even, odd));
                    }
                }
                for (int t = 0; t < tiles; t++) {
                    _tile_loadd(5, value_tiles + t * 512, 64);
                    DP_INTO(t, 4, 5)
                }
                continue;
            }
            for (int t = 0; t < tiles; t++) {
                const long column = offset + d0 + 16 * t;
                for (int p = 0; p < 16; p++) {
                    const long l = pair_block * 32 + 2 * p;
                    const __m512i even = cache_bits(values, split, slots, mask, max_len, l, kv_dim, column);
                    const __m512i odd = cache_bits(values, split, slots, mask, max_len, l + 1, kv_dim, column);
                    if (split) {
                        __m512i even_high, even_low, odd_high, odd_low;
                        split_f16_bits(even, &even_high, &even_low);
                        split_f16_bits(odd, &odd_high, &odd_low);
                        _mm512_storeu_si512((__m512i *)(staging + 32 * p), pair_row(even_high, odd_high));
                        _mm512_storeu_si512((__m512i *)(staging_low + 32 * p), pair_row(even_low, odd_low));
                    } else {
                        _mm512_storeu_si512((__m512i *)(staging + 32 * p), pair_row(even, odd));
                    }
                }
                _tile_loadd(5, staging, 64);
                DP_INTO(t, 4, 5)
                if (split) {
                    _tile_loadd(7, staging_low, 64);
                    DP_INTO(t, 4, 7)
                    DP_INTO(t, 6, 5)
                }
            }
        }
        for (int t = 0; t < tiles; t++) {
            store_c_tile(t, tile, 64);
            for (int h = 0; h < heads; h++)
                for (int c = 0; c < 16; c++) {
                    const int dim = split ? 16 * t + c : 32 * (t / 2) + 8 * (c / 4) + 4 * (t % 2) + c % 4; /* column_dim */
                    out[(long)h * head_dim + d0 + dim] = tile[h][c] * inverse[h];
                }
        }
    }
    _tile_release();
    return 1;
}
#endif

int starchat_amx_attention(const float *q, int heads, const uint16_t *keys, const uint16_t *values, int type, long kv_dim,
                           long offset, const int64_t *slots, const float *mask, long max_len, int head_dim, float scale,
                           float *out, float *stats, float *scratch) {
#if HAVE_AMX
    if (type != W_BF16 && type != W_F16) return 0;
    return attention_item(q, heads, keys, values, type == W_F16, kv_dim, offset, slots, mask, max_len, head_dim, scale, out,
                          stats, scratch);
#else
    (void)q; (void)heads; (void)keys; (void)values; (void)type; (void)kv_dim; (void)offset; (void)slots; (void)mask; (void)max_len;
    (void)head_dim; (void)scale; (void)out; (void)stats; (void)scratch;
    return 0;
#endif
}

long starchat_amx_attention_scratch(long max_len, int head_dim) {
    const long blocks = (max_len + 31) / 32 * 2;
    return blocks * 256 + (2 * (blocks / 2) * 512 + 2 * (head_dim / 32) * 512 + 6 * 512) / 2 + 16;
}

int starchat_amx_init(void) {
#if HAVE_AMX
    if (!amx_granted) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: the kernel grants the tile state */
        amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_granted;
#else
    return 0;
#endif
}

void starchat_amx_disable(void) {
#if HAVE_AMX
    amx_granted = 0; /* every AMX path here checks it: products and attention take the vector code */
#endif
}

int starchat_amx_ready(void) {
#if HAVE_AMX
    return amx_granted;
#else
    return 0;
#endif
}

long starchat_amx_int8_max_rows(long k) {
#if HAVE_AMX && HAVE_AMX_INT8
    /* the rows' hi and lo parts, 16-row blocks of K padded to 64, within INT8_ROWS_MAX_BYTES */
    /* (none past K 32,768, so a tile's int32 sums of int8 x hi, up to 127 x 127 x K, never overflow) */
    return amx_granted && k > 0 ? INT8_ROWS_MAX_BYTES / (2 * ((k + 63) / 64 * 64)) / 16 * 16 : 0;
#else
    (void)k;
    return 0;
#endif
}

int starchat_amx_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
#if HAVE_AMX
    /* The same answer on every thread of the region (they all meet the loops below or none). */
    if (!amx_granted || (wtype != W_BF16 && wtype != W_I8 && wtype != W_F16)) return 0;
#if HAVE_AMX_INT8
    if (wtype == W_I8 && m <= starchat_amx_int8_max_rows(k)) return int8_columns(x, m, (const int8_t *)w, out, n, k);
#endif
    /* float16 weights are exact as two bfloat16 halves; their activations get a low half too, so
     * the product keeps more than float16's precision (three tile products instead of one). */
    const int split = wtype == W_F16;
    const long k_padded = (k + 31) / 32 * 32, row_blocks = (m + 15) / 16, padded_rows = row_blocks * 16;
    uint16_t *rows = NULL;
#pragma omp single copyprivate(rows)
    rows = (uint16_t *)aligned_alloc(64, (size_t)((split ? 2 : 1) * padded_rows * k_padded * 2 + 63) / 64 * 64);
    if (!rows) return 0;
    uint16_t *rows_low = split ? rows + padded_rows * k_padded : NULL;
#pragma omp for schedule(static)
    for (long r = 0; r < padded_rows; r++) {
        const long at = r / 16 * 16 * k_padded + r % 16 * 32;
        row_to_bf16(r < m ? x + r * k : NULL, k, k_padded, rows + at, split ? rows_low + at : NULL);
    }
    configure_tiles();
    /* With more than one pass of row blocks, panels go in groups: each group's B tiles are built
     * in its first pass and kept (this thread's copy: 1-2 KiB per 32 rows of K and panel), and
     * every pass of rows (in L2) multiplies the whole group, so the rows are read once per group
     * rather than once per panel. Rows longer than L2 holds (K_BLOCK_FROM: StarChat-beta's 24,576
     * of c_proj; 6,144 in float16) go K_STEPS steps of K at a time across the group, the partial
     * sums kept between them: 512 x 24,576 x 512 in bfloat16 12.4 against 18.4 ms,
     * float16 38 against 49, 64 rows of float16 2.8 against 4.3 (2-core Xeon). Those steps of K
     * are the outer loop (long_rows): each step's tiles for a group of LONG_ROW_PANELS panels are
     * built in the first pass and serve every pass from cache, the sums of all row blocks wait in
     * `sums` (this thread's share of one buffer) for the next step, so the rows are read once per
     * 16 panels; passes outside steps of K had read the group's kept tiles (3 MiB, past L2) once
     * per pass and the rows once per 4 panels: StarChat-beta's c_proj (512 x 24,576 x 6,144) 73-78
     * against 98-113 ms in bfloat16, 64-70 against 95-102 in int8, float16 shapes x1.1-1.3, the
     * same bits. Otherwise (one pass of short rows) B tiles are built per step of K, no copy. The
     * groups are the same on every thread (one loop to share); a thread that gets no memory for its
     * kept tiles (or would keep more than KEPT_TILES_MAX) builds per step instead. */
    const long tile_values = (split ? 2 : 1) * 512, passes = (row_blocks + ROW_BLOCKS_PER_PASS - 1) / ROW_BLOCKS_PER_PASS;
    uint16_t step_tiles[2 * 2 * 512] __attribute__((aligned(64))); /* two steps' tiles (panel_steps) */
    const long panel_values = k_padded / 32 * tile_values, blocks = (n + PANEL - 1) / PANEL, panel_bytes = k * PANEL * element_size(wtype);
    const long pass_bytes = (row_blocks < ROW_BLOCKS_PER_PASS ? row_blocks : ROW_BLOCKS_PER_PASS) * 16 * k_padded * 2 * (split ? 2 : 1);
    /* Steps of K outermost (long_rows) also where all rows together exceed ALL_ROWS_FROM and
     * groups of 4 panels would read them from beyond L2 many times: enough panels for 4 groups of
     * 16 a thread (fewer left the threads unevenly loaded: tiny_starcoder's float16 c_proj at 512
     * rows x0.93). */
    const long all_rows_bytes = padded_rows * k_padded * 2 * (split ? 2 : 1);
    const int many_groups = blocks >= LONG_ROW_PANELS * 4 * omp_get_num_threads();
    const long k_block = pass_bytes > K_BLOCK_FROM || (passes > 1 && all_rows_bytes > ALL_ROWS_FROM && many_groups)
                             ? (split ? K_STEPS_SPLIT : K_STEPS) * 32 : k_padded;
    const int long_rows = k_block < k_padded;
    const long kept_bytes = PANELS_PER_GROUP * panel_values * 2;
    uint16_t *group_tiles = passes > 1 && !long_rows && kept_bytes <= KEPT_TILES_MAX ? (uint16_t *)aligned_alloc(64, (size_t)kept_bytes) : NULL;
    const int cached = group_tiles != NULL;
    /* long_rows: each thread's sums (LONG_ROW_PANELS x row_blocks C tiles) and one step of K's
     * tiles for the group, in one allocation for the team so that every thread sees it or none. */
    const long sums_bytes = LONG_ROW_PANELS * row_blocks * 16 * PANEL * (long)sizeof(float);
    const long step_bytes = LONG_ROW_PANELS * (k_block / 32) * tile_values * 2, thread_bytes = sums_bytes + step_bytes;
    char *long_rows_memory = NULL;
    if (long_rows) {
#pragma omp single copyprivate(long_rows_memory)
        long_rows_memory = (char *)aligned_alloc(64, (size_t)(omp_get_num_threads() * thread_bytes));
        if (!long_rows_memory) {
            _tile_release();
#pragma omp barrier
#pragma omp single
            free(rows);
            return 0;
        }
    }
    float (*sums)[16][PANEL] = long_rows ? (float (*)[16][PANEL])(long_rows_memory + omp_get_thread_num() * thread_bytes) : NULL;
    uint16_t *step_group_tiles = long_rows ? (uint16_t *)(long_rows_memory + omp_get_thread_num() * thread_bytes + sums_bytes) : NULL;
    /* Decode steps of up to 32 sequences: panels two at a time (panel_pair_steps); 33-64 rows of
     * bfloat16 weights as two passes of them, the second building the pair's B tiles again from
     * L2 (one permutation per tile row): every layer of tiny_starcoder streamed at 48 / 64 rows
     * 18.7-19.3 / 20.6-21.9 against 22.0-22.2 / 25.0-25.2 ms. int8 B tiles cost too much to build
     * twice (19.2-19.6 ms at 64 rows took 23.5-27.9). */
    const int pairs = !split && passes == 1 && (row_blocks <= 2 || wtype == W_BF16) && k_block == k_padded;
    /* Passes of bfloat16 tiles with kept B tiles multiply in 2 x 2 blocks (two row blocks by two
     * panels: panel_pair_steps, four A and B tile loads for four tile products, where a panel with
     * four row blocks takes five): at 512 rows a tile product took 19.6 against 22 ns on one core
     * of the 2-core Xeon (a stand-alone loop of each: 7.9 against 12.8, the rest being the output's
     * stores), c_fc 512 x 768 x 3,072 x1.14, c_proj x1.12. */
    const int quads = !split && cached && k_block == k_padded;
    const long group_panels = long_rows ? LONG_ROW_PANELS : pairs ? 2 : passes > 1 ? PANELS_PER_GROUP : 1;
    const long groups = (blocks + group_panels - 1) / group_panels;
    float c[16][PANEL] __attribute__((aligned(64)));
    float partials[PANELS_PER_GROUP][ROW_BLOCKS_PER_PASS][16][PANEL] __attribute__((aligned(64)));
#pragma omp for schedule(static) nowait
    for (long group = 0; group < groups; group++) {
        const long first_block = group * group_panels, end_block = first_block + group_panels < blocks ? first_block + group_panels : blocks;
        if (pairs && end_block - first_block == 2) {
            const long n0 = first_block * PANEL;
            for (long first = 0; first < row_blocks; first += 2)
                panel_pair_steps((const char *)w + first_block * panel_bytes, panel_bytes, wtype, k, k_padded, 0, k_padded, rows,
                                 first, row_blocks - first < 2 ? row_blocks - first : 2, step_tiles, NULL, 0, 1, NULL, 0, c, out, m, n0,
                                 n - n0 - PANEL < PANEL ? n - n0 - PANEL : PANEL);
            continue;
        }
        if (quads) {
            for (long first = 0; first < row_blocks; first += ROW_BLOCKS_PER_PASS) {
                const long pass_end = first + ROW_BLOCKS_PER_PASS < row_blocks ? first + ROW_BLOCKS_PER_PASS : row_blocks;
                for (long block = first_block; block < end_block; block += 2) {
                    const long n0 = block * PANEL;
                    uint16_t *kept = group_tiles + (block - first_block) * panel_values;
                    if (block + 1 == end_block) { /* the weight's last panel, alone */
                        panel_steps((const char *)w + block * panel_bytes, wtype, 0, k, k_padded, 0, k_padded,
                                    rows + first * 16 * k_padded, NULL, pass_end - first, kept, 0, 1, partials[0], c, out, m,
                                    first, n0, n - n0);
                        continue;
                    }
                    for (long pair = first; pair < pass_end; pair += 2)
                        panel_pair_steps((const char *)w + block * panel_bytes, panel_bytes, wtype, k, k_padded, 0, k_padded, rows,
                                         pair, pass_end - pair < 2 ? pass_end - pair : 2, step_tiles, kept, 0, pair == 0, NULL, 0, c,
                                         out, m, n0,
                                         n - n0 - PANEL < PANEL ? n - n0 - PANEL : PANEL);
                }
            }
            continue;
        }
        if (long_rows) {
            for (long k_begin = 0; k_begin < k_padded; k_begin += k_block) {
                const long k_end = k_begin + k_block < k_padded ? k_begin + k_block : k_padded;
                for (long first = 0; first < row_blocks; first += ROW_BLOCKS_PER_PASS) {
                    const long count = row_blocks - first < ROW_BLOCKS_PER_PASS ? row_blocks - first : ROW_BLOCKS_PER_PASS;
                    const uint16_t *a = rows + first * 16 * k_padded, *a_low = split ? rows_low + first * 16 * k_padded : NULL;
                    /* bfloat16 tiles (bfloat16 and int8 weights): 2 x 2 blocks as in the passes above,
                     * a pair's tiles of the step side by side; a group's odd last panel alone below */
                    for (long block = first_block; !split && block + 1 < end_block; block += 2) {
                        const long n0 = block * PANEL, pass_end = first + count;
                        uint16_t *kept = step_group_tiles + (block - first_block) * (k_block / 32) * 512;
                        for (long pair = first; pair < pass_end; pair += 2)
                            panel_pair_steps((const char *)w + block * panel_bytes, panel_bytes, wtype, k, k_padded, k_begin, k_end,
                                             rows, pair, pass_end - pair < 2 ? pass_end - pair : 2, step_tiles, kept, k_begin,
                                             pair == 0, sums + (block - first_block) * row_blocks + pair, row_blocks, c, out, m,
                                             n0, n - n0 - PANEL < PANEL ? n - n0 - PANEL : PANEL);
                    }
                    for (long block = split ? first_block : end_block - (end_block - first_block) % 2; block < end_block; block++) {
                        const char *panel = (const char *)w + block * panel_bytes;
                        const long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
                        uint16_t *tiles = step_group_tiles + (block - first_block) * (k_block / 32) * tile_values;
                        float (*partial)[16][PANEL] = sums + (block - first_block) * row_blocks + first;
                        if (split)
                            panel_steps(panel, wtype, 1, k, k_padded, k_begin, k_end, a, a_low, count, tiles, k_begin, 1, partial, c, out, m, first, n0, columns);
                        else
                            panel_steps(panel, wtype, 0, k, k_padded, k_begin, k_end, a, a_low, count, tiles, k_begin, 1, partial, c, out, m, first, n0, columns);
                    }
                }
            }
            continue;
        }
        for (long first = 0; first < row_blocks; first += ROW_BLOCKS_PER_PASS) {
            const long count = row_blocks - first < ROW_BLOCKS_PER_PASS ? row_blocks - first : ROW_BLOCKS_PER_PASS;
            const uint16_t *a = rows + first * 16 * k_padded, *a_low = split ? rows_low + first * 16 * k_padded : NULL;
            for (long k_begin = 0; k_begin < k_padded; k_begin += k_block) {
                const long k_end = k_begin + k_block < k_padded ? k_begin + k_block : k_padded;
                for (long block = first_block; block < end_block; block++) {
                    const char *panel = (const char *)w + block * panel_bytes;
                    const long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
                    uint16_t *tiles = cached ? group_tiles + (block - first_block) * panel_values : step_tiles;
                    float (*partial)[16][PANEL] = partials[block - first_block];
                    if (split)
                        panel_steps(panel, wtype, 1, k, k_padded, k_begin, k_end, a, a_low, count, tiles, 0, cached, partial, c, out, m, first, n0, columns);
                    else
                        panel_steps(panel, wtype, 0, k, k_padded, k_begin, k_end, a, a_low, count, tiles, 0, cached, partial, c, out, m, first, n0, columns);
                }
            }
        }
    }
    _tile_release();
    free(group_tiles);
#pragma omp barrier
#pragma omp single
    {
        free(rows);
        free(long_rows_memory);
    }
    return 1;
#else
    (void)x; (void)m; (void)w; (void)wtype; (void)out; (void)n; (void)k;
    return 0;
#endif
}
