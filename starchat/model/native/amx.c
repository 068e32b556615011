/* Products on AMX tiles straight from the packed panels (linear.c's layout), for bfloat16 and int8
 * weights on CPUs with AMX-BF16 (Intel Xeon since Sapphire Rapids).
 *
 * Decode steps of tens of sequences were the gap: the native tiles are bound by FMAs there
 * (2.1 ms for one tiny_starcoder layer's products at 32 rows), oneDNN's AMX product needs plain
 * weight rows (unpacking them per call cost as much as the product saved), and keeping a second,
 * unpacked copy would double the model's memory. Here each panel is turned into AMX's B-tile
 * layout (pairs of K interleaved per column) 32 rows of K at a time, in a 1 KiB buffer, as it
 * streams by: the tiles multiply while the weights are read once.
 *
 * The activations are rounded to bfloat16 (as oneDNN's AMX products round them on the prefill
 * path, and as HF's bfloat16 models round every product's input); sums, scales and bias stay
 * float32. Used from `amx_min_rows` rows up where the caller asks (Output.amx_min_rows), after
 * starchat_amx_init() was granted the tile state by the kernel.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#if HAVE_AMX
static int amx_granted = 0;

/* Tile registers: C tiles tmm0-3 (four blocks of 16 rows per pass over a panel), A in tmm4, B in tmm5. */
#define ROW_BLOCKS_PER_PASS 4

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Panel row j (PANEL weights) as bfloat16; zeros past the last row of K. */
static inline __m256i panel_row_bf16(const void *panel, int wtype, long j, long k) {
    if (j >= k) return _mm256_setzero_si256();
    if (wtype == W_BF16) return _mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + j * PANEL));
    /* int8: exact in float32, whose high half is then the bfloat16 */
    const __m512 widened = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)panel + j * PANEL))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(widened), 16));
}

/* The B tile of rows k0 .. k0 + 31 of a panel: row p holds, for each column c, the weights of
 * rows k0 + 2p and k0 + 2p + 1 side by side (64 bytes). */
static inline void b_tile(const void *panel, int wtype, long k, long k0, uint16_t tile[16 * 32]) {
    const long row_bytes = PANEL * element_size(wtype);
    for (int p = 0; p < 16; p++) {
        _mm_prefetch((const char *)panel + (k0 + 2 * p + 64) * row_bytes, _MM_HINT_T0); /* 2 KiB ahead (bf16) */
        const __m256i even = panel_row_bf16(panel, wtype, k0 + 2 * p, k), odd = panel_row_bf16(panel, wtype, k0 + 2 * p + 1, k);
        const __m256i low = _mm256_unpacklo_epi16(even, odd), high = _mm256_unpackhi_epi16(even, odd); /* within lanes */
        _mm256_store_si256((__m256i *)(tile + 32 * p), _mm256_permute2x128_si256(low, high, 0x20));
        _mm256_store_si256((__m256i *)(tile + 32 * p + 16), _mm256_permute2x128_si256(low, high, 0x31));
    }
}

/* Activation row r (k float32) as bfloat16, zero-padded to k_padded. */
static inline void row_to_bf16(const float *x, long k, long k_padded, uint16_t *out) {
    long j = 0;
    for (; j + 16 <= k; j += 16) _mm256_storeu_si256((__m256i *)(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
    for (; j < k; j++) out[j] = f32_to_bf16(x[j]);
    for (; j < k_padded; j++) out[j] = 0;
}
#endif

int starchat_amx_init(void) {
#if HAVE_AMX
    if (!amx_granted) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: the kernel grants the tile state */
        amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_granted;
#else
    return 0;
#endif
}

int starchat_amx_columns(const float *x, long m, const void *w, int wtype, const Output *out, long n, long k) {
#if HAVE_AMX
    /* The same answer on every thread of the region (they all meet the loops below or none). */
    if (!amx_granted || (wtype != W_BF16 && wtype != W_I8)) return 0;
    const long k_padded = (k + 31) / 32 * 32, row_blocks = (m + 15) / 16, stride = k_padded * 2;
    uint16_t *rows = NULL;
#pragma omp single copyprivate(rows)
    rows = (uint16_t *)aligned_alloc(64, (size_t)(row_blocks * 16 * stride + 63) / 64 * 64);
    if (!rows) return 0;
#pragma omp for schedule(static)
    for (long r = 0; r < row_blocks * 16; r++) {
        if (r < m)
            row_to_bf16(x + r * k, k, k_padded, rows + r * k_padded);
        else
            memset(rows + r * k_padded, 0, (size_t)stride);
    }
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int t = 0; t < 6; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
    uint16_t b[16 * 32] __attribute__((aligned(64)));
    float c[16][PANEL] __attribute__((aligned(64)));
    const long blocks = (n + PANEL - 1) / PANEL, panel_bytes = k * PANEL * element_size(wtype);
#pragma omp for schedule(static) nowait
    for (long block = 0; block < blocks; block++) {
        const char *panel = (const char *)w + block * panel_bytes;
        const long n0 = block * PANEL, columns = n - n0 < PANEL ? n - n0 : PANEL;
        for (long first = 0; first < row_blocks; first += ROW_BLOCKS_PER_PASS) {
            const long count = row_blocks - first < ROW_BLOCKS_PER_PASS ? row_blocks - first : ROW_BLOCKS_PER_PASS;
            const uint16_t *a = rows + first * 16 * k_padded;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long k0 = 0; k0 < k_padded; k0 += 32) {
                b_tile(panel, wtype, k, k0, b);
                _tile_loadd(5, b, 64);
                _tile_loadd(4, a + k0, stride);
                _tile_dpbf16ps(0, 4, 5);
                if (count > 1) {
                    _tile_loadd(4, a + 16 * k_padded + k0, stride);
                    _tile_dpbf16ps(1, 4, 5);
                }
                if (count > 2) {
                    _tile_loadd(4, a + 32 * k_padded + k0, stride);
                    _tile_dpbf16ps(2, 4, 5);
                }
                if (count > 3) {
                    _tile_loadd(4, a + 48 * k_padded + k0, stride);
                    _tile_dpbf16ps(3, 4, 5);
                }
            }
            for (long t = 0; t < count; t++) {
                switch (t) { /* tile numbers are immediates */
                case 0: _tile_stored(0, c, 64); break;
                case 1: _tile_stored(1, c, 64); break;
                case 2: _tile_stored(2, c, 64); break;
                default: _tile_stored(3, c, 64); break;
                }
                const long row0 = (first + t) * 16;
                store_tile_rows(out, row0, (int)(m - row0 < 16 ? m - row0 : 16), n0, columns, c);
            }
        }
    }
    _tile_release();
#pragma omp barrier
#pragma omp single
    free(rows);
    return 1;
#else
    (void)x; (void)m; (void)w; (void)wtype; (void)out; (void)n; (void)k;
    return 0;
#endif
}
