/* Prompt attention on AMX tiles: every prefill chunk of a step in one call.
 *
 * A chunk of n new tokens after c cached ones: token t's query heads attend to keys 0 .. c + t
 * (causal, aligned to the bottom right). PyTorch's CPU attention took one call per chunk (8
 * chunks of 64 tokens spent 25 ms of a 145 ms step in those calls on the 2-core Xeon) and, for a
 * 512-token prompt of tiny_starcoder, 1.3 ms per layer in bfloat16 and 3.8 in float32.
 *
 * Per chunk and KV head, the keys are put once into bfloat16 A tiles and the values, transposed,
 * into A tiles of V^T. Then each block of 16 query rows of that KV head,
 * (token, head) pairs token-major (a multi-query model's heads share the keys, so a block spans
 * one or two tokens; bfloat16 takes two blocks per pass over the keys), runs:
 *   S^T = K Q^T, a key per tile row and a query per column (lane),
 *   the softmax down each lane over its keys (max, then exponentials and their sum), the
 *   weights rounded into B tiles whose rows are pairs of keys,
 *   O^T = V^T P^T, a dimension per row and a query per lane, then 1 / sum and a transpose out.
 * Two passes over materialised scores (16 queries x the keys, float32, in L2) for up to
 * MAX_BLOCK_KEYS keys; past that the keys go KEY_BLOCK at a time with an online softmax, for
 * ITEM_GROUP items of query rows at a time (query_item): O^T kept in memory between key blocks,
 * where it is rescaled (the accumulator tiles cannot be rescaled in place).
 *
 * Precision (`split`): 0 rounds queries, keys, values and weights to bfloat16, sums float32, as
 * PyTorch's bfloat16 attention does (bfloat16 and int8 models: their products round the same
 * activations); 1 keeps 16 bits of each as two bfloat16 halves and multiplies three pairs, as
 * amx.c's float16 products do (float16 models, whose prompt attention was float32).
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "kernels.h"
#include "vector_math.h"

/* One chunk's description, int64 fields in this order (Python builds them). */
enum {
    CHUNK_Q_ROW,    /* its first row in q and out */
    CHUNK_LENGTH,   /* new tokens */
    CHUNK_CONTEXT,  /* cached tokens before them */
    CHUNK_KEYS,     /* address of key row 0 */
    CHUNK_VALUES,   /* address of value row 0 */
    CHUNK_KV_TYPE,  /* W_F32, W_F16 or W_BF16 */
    CHUNK_KV_STRIDE, /* elements from one key (value) row to the next */
    CHUNK_SLOTS,    /* address of context + length int64 row numbers, or 0: rows 0, 1, 2, ... */
    CHUNK_FIELDS
};

#if HAVE_AMX

typedef struct {
    const int64_t *chunks;
    long num_chunks;
    int heads, kv_heads, head_dim, split;
    float scale;
    const float *q;
    long q_stride;
    float *out;
    long out_stride;
    uint16_t *tiles;     /* every chunk's keys and V^T, per KV head (tile_offsets) */
    long *tile_offsets;  /* per chunk: where its KV heads' keys start in tiles */
    long *prepare_items; /* per chunk: its first 32-key block in the flattened preparation work (num_chunks + 1) */
    long *query_items;   /* per chunk: its first 16-row query block in the flattened attention work (num_chunks + 1) */
} Problem;

static inline long chunk_keys(const int64_t *chunk) { return chunk[CHUNK_CONTEXT] + chunk[CHUNK_LENGTH]; }
static inline long padded_keys(const int64_t *chunk) { return (chunk_keys(chunk) + 31) / 32 * 32; }

/* uint16 values of one KV head's tiles: keys (padded x head_dim) and V^T (head_dim x padded), each
 * twice with split halves. Both are stored tile by tile (16 rows x 32 values, 1 KiB contiguous):
 * tile loads with a power-of-two row stride of a kilobyte or more (V^T's rows) came from a few L1
 * sets and missed. Keys: tile (l / 16, step of 32 dimensions), row l % 16. V^T: tile (pair block
 * of 32 keys, d / 16), row d % 16: the tiles a step of the product reads lie together. */
static inline long head_tile_values(const Problem *p, const int64_t *chunk) {
    return (p->split ? 2 : 1) * 2 * padded_keys(chunk) * p->head_dim;
}

/* The chunk whose range of `starts` (non-decreasing, num_chunks + 1 entries) holds item. */
static inline long chunk_of(const long *starts, long num_chunks, long item) {
    long low = 0, high = num_chunks - 1;
    while (low < high) {
        const long middle = (low + high + 1) / 2;
        if (starts[middle] <= item) low = middle;
        else high = middle - 1;
    }
    return low;
}

/* 16 values of a key or value row from element `column`, as float32. */
static inline __m512 load16(const int64_t *chunk, long row_address, long l, long column) {
    const int type = (int)chunk[CHUNK_KV_TYPE];
    const int64_t *slots = (const int64_t *)chunk[CHUNK_SLOTS];
    const long at = (slots ? slots[l] : l) * chunk[CHUNK_KV_STRIDE] + column;
    if (type == W_F32) return _mm512_loadu_ps((const float *)row_address + at);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row_address + at));
    return type == W_F16 ? _mm512_cvtph_ps(raw) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* Keys block .. block + 31 of one chunk's KV head into their key tiles and V^T tiles (the layout
 * above), zeros past the last key. */
static void prepare_block(const Problem *p, const int64_t *chunk, int kv_head, long block, uint16_t *tiles) {
    const long keys = chunk_keys(chunk), padded = padded_keys(chunk), d = p->head_dim;
    const long half = padded * d; /* uint16 values per array */
    uint16_t *key_high = tiles, *key_low = tiles + half;
    uint16_t *vt_high = tiles + (p->split ? 2 : 1) * half, *vt_low = vt_high + half;
    const long column0 = (long)kv_head * d, steps = d / 32;
    for (long l = block; l < block + 32; l++) {
        for (long d0 = 0; d0 < d; d0 += 32) {
            __m512i high = _mm512_setzero_si512(), low = _mm512_setzero_si512();
            if (l < keys)
                row_halves(load16(chunk, chunk[CHUNK_KEYS], l, column0 + d0),
                           load16(chunk, chunk[CHUNK_KEYS], l, column0 + d0 + 16), 0, &high, &low);
            const long at = (l / 16 * steps + d0 / 32) * 512 + l % 16 * 32;
            _mm512_storeu_si512((__m512i *)(key_high + at), high);
            if (p->split) _mm512_storeu_si512((__m512i *)(key_low + at), low);
        }
    }
    /* V^T: for 16 dimensions, rows of key pairs (pair_row) transposed into rows of 32 keys. */
    for (long d0 = 0; d0 < d; d0 += 16) {
        __m512i high[16], low[16];
        for (int pair = 0; pair < 16; pair++) {
            __m512i halves[2][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()}, {_mm512_setzero_si512(), _mm512_setzero_si512()}};
            for (int odd = 0; odd < 2; odd++) {
                const long l = block + 2 * pair + odd;
                if (l < keys) lane_halves(load16(chunk, chunk[CHUNK_VALUES], l, column0 + d0), &halves[odd][0], &halves[odd][1]);
            }
            high[pair] = pair_row(halves[0][0], halves[1][0]);
            low[pair] = pair_row(halves[0][1], halves[1][1]);
        }
        transpose_16x16(high);
        if (p->split) transpose_16x16(low);
        const long tile = (block / 32 * (d / 16) + d0 / 16) * 512;
        for (int j = 0; j < 16; j++) {
            _mm512_storeu_si512((__m512i *)(vt_high + tile + 32 * j), high[j]);
            if (p->split) _mm512_storeu_si512((__m512i *)(vt_low + tile + 32 * j), low[j]);
        }
    }
}

/* O^T tile t (0-3) += V^T P^T for one pair block; tile numbers are immediates, hence a macro.
 * bfloat16: V^T tiles alternate between tmm4 and tmm6, so a load need not wait for the product
 * reading the previous one. */
#define VALUES_INTO(t, a)                                                                    \
    if (tiles_now > t) {                                                                     \
        const long tile = (pair_block * (d / 16) + d0 / 16 + t) * 512;                       \
        if (split) {                                                                         \
            _tile_loadd(4, vt_high + tile, 64);                                              \
            _tile_dpbf16ps(t, 4, 5);                                                         \
            _tile_dpbf16ps(t, 4, 7);                                                         \
            _tile_loadd(6, vt_low + tile, 64);                                               \
            _tile_dpbf16ps(t, 6, 5);                                                         \
        } else {                                                                             \
            _tile_loadd(a, vt_high + tile, 64);                                              \
            _tile_dpbf16ps(t, a, 5);                                                         \
        }                                                                                    \
    }

/* S^T tile t (0-3) += K Q^T for one step of 32 dimensions (Q^T's tiles in tmm5 / tmm7). */
#define KEYS_INTO(t, a)                                                                      \
    if (count > t) {                                                                         \
        const long tile = ((block + t) * steps + step) * 512;                                \
        if (split) {                                                                         \
            _tile_loadd(4, key_high + tile, 64);                                             \
            _tile_dpbf16ps(t, 4, 5);                                                         \
            _tile_dpbf16ps(t, 4, 7);                                                         \
            _tile_loadd(6, key_low + tile, 64);                                              \
            _tile_dpbf16ps(t, 6, 5);                                                         \
        } else {                                                                             \
            _tile_loadd(a, key_high + tile, 64);                                             \
            _tile_dpbf16ps(t, a, 5);                                                         \
        }                                                                                    \
    }

/* Each lane's maximum of `best` and its scores of keys from .. to - 1 (16 lanes a key; scores
 * starts at key first_key), among keys below its limit and below `keys`; keys below open_keys are
 * below every lane's limit. Four independent maxima: one chain waits 4 cycles a key. */
static inline __m512 lane_maximum(const float *scores, long first_key, long from, long to, long keys, long open_keys,
                                  __m512i limits, __m512 best) {
    if (to > keys) to = keys;
    const long open_end = open_keys < to ? open_keys : to;
    __m512 m[4] = {best, best, best, best};
    long l = from;
    for (; l + 4 <= open_end; l += 4)
        for (int i = 0; i < 4; i++) m[i] = _mm512_max_ps(m[i], _mm512_loadu_ps(scores + (l + i - first_key) * 16));
    for (; l < open_end; l++) m[0] = _mm512_max_ps(m[0], _mm512_loadu_ps(scores + (l - first_key) * 16));
    for (; l < to; l++)
        m[1] = _mm512_mask_max_ps(m[1], _mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32((int)l)), m[1],
                                  _mm512_loadu_ps(scores + (l - first_key) * 16));
    return _mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3]));
}

/* The 16 query rows first .. first + 15 of a chunk's KV head (of its length x group rows: (token,
 * head) pairs, token-major): where each lane reads and writes, and how many keys it sees. */
typedef struct {
    int32_t limit[16] __attribute__((aligned(64)));
    const float *query_row[16];
    float *out_row[16];
    long keys, least_limit; /* the most and the fewest keys a lane with a query sees */
} QueryLanes;

static void query_lanes(const Problem *p, const int64_t *chunk, int kv_head, long first, QueryLanes *lanes) {
    const int d = p->head_dim, group = p->heads / p->kv_heads;
    const long rows = chunk[CHUNK_LENGTH] * group, context = chunk[CHUNK_CONTEXT];
    lanes->keys = 0, lanes->least_limit = LONG_MAX;
    for (int i = 0; i < 16; i++) {
        const long r = first + i, token = r / group;
        const int head = kv_head * group + (int)(r % group);
        lanes->limit[i] = r < rows ? (int32_t)(context + token + 1) : 0;
        lanes->query_row[i] = r < rows ? p->q + (chunk[CHUNK_Q_ROW] + token) * p->q_stride + (long)head * d : NULL;
        lanes->out_row[i] = r < rows ? p->out + (chunk[CHUNK_Q_ROW] + token) * p->out_stride + (long)head * d : NULL;
        if (lanes->limit[i] > lanes->keys) lanes->keys = lanes->limit[i];
        if (r < rows && lanes->limit[i] < lanes->least_limit) lanes->least_limit = lanes->limit[i];
    }
}

/* Q^T as B tiles, one per step of 32 dimensions: row j, column i = query i's dimensions 2j, 2j + 1
 * of the step (with `low`, also what bfloat16 rounding left out). */
static void query_tiles(const QueryLanes *lanes, int steps, uint16_t *high_tiles, uint16_t *low_tiles) {
    for (int step = 0; step < steps; step++) {
        __m512i high[16], low[16];
        for (int i = 0; i < 16; i++) {
            if (lanes->query_row[i]) {
                const __m512 first = _mm512_loadu_ps(lanes->query_row[i] + step * 32);
                const __m512 second = _mm512_loadu_ps(lanes->query_row[i] + step * 32 + 16);
                if (low_tiles) {
                    row_halves(first, second, 0, &high[i], &low[i]);
                } else {
                    high[i] = (__m512i)_mm512_cvtne2ps_pbh(second, first); /* rounded to nearest, in order */
                }
            } else {
                high[i] = low[i] = _mm512_setzero_si512();
            }
        }
        transpose_16x16(high);
        if (low_tiles) transpose_16x16(low);
        for (int j = 0; j < 16; j++) {
            _mm512_storeu_si512((__m512i *)(high_tiles + step * 512 + 32 * j), high[j]);
            if (low_tiles) _mm512_storeu_si512((__m512i *)(low_tiles + step * 512 + 32 * j), low[j]);
        }
    }
}

/* The softmax weights down each lane of scores (keys first_key .. x 16 lanes; `pair_blocks` 32-key
 * steps) against lane maxima `best`, in base 2 with the scale folded in: 2^(c s - c max), c = scale
 * log2(e) (scale > 0). Keys below every lane's limit need no mask (most of them: the causal edge
 * is one or two tokens of the block); lanes without a query are never read back. The weights go
 * into B tiles (row `pair`: keys 2 pair and 2 pair + 1 of each lane side by side; with p_low, as
 * two halves); their sums are returned. Weights rounded to one bfloat16 each take a shorter
 * exponential (relative error 7.5e-5, not 1e-7: exp2_nonpositive16_bf16). */
static __m512 softmax_weights(const float *scores, long first_key, long pair_blocks, const QueryLanes *lanes, __m512 best,
                              float scale, uint16_t *p_high, uint16_t *p_low) {
    const __m512i limits = _mm512_load_si512((const void *)lanes->limit);
    const long open_keys = lanes->least_limit;
    const __m512 c = _mm512_set1_ps(scale * 1.4426950408889634f), offset = _mm512_mul_ps(best, c);
    const __m512i interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                                                 0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001a000a, 0x001b000b,
                                                 0x001c000c, 0x001d000d, 0x001e000e, 0x001f000f);
    __m512 total = _mm512_setzero_ps();
    for (long pair = 0; pair < pair_blocks * 16; pair++) {
        __m512 w[2];
        for (int odd = 0; odd < 2; odd++) {
            const long local = 2 * pair + odd, key = first_key + local;
            const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(scores + local * 16), c, offset);
            w[odd] = p_low ? exp2_nonpositive16(x) : exp2_nonpositive16_bf16(x); /* bfloat16 weights: 8 bits suffice */
            if (key >= open_keys) w[odd] = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32((int)key)), w[odd]);
            total = _mm512_add_ps(total, w[odd]);
        }
        if (p_low) {
            __m512i high[2], low[2];
            for (int odd = 0; odd < 2; odd++) lane_halves(w[odd], &high[odd], &low[odd]);
            _mm512_storeu_si512((__m512i *)(p_high + pair * 32), pair_row(high[0], high[1]));
            _mm512_storeu_si512((__m512i *)(p_low + pair * 32), pair_row(low[0], low[1]));
        } else { /* both rounded to nearest in one instruction, then their words interleaved */
            _mm512_storeu_si512((__m512i *)(p_high + pair * 32),
                                _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0])));
        }
    }
    return total;
}

/* O^T rows d0 .. d0 + 15 (a dimension per row, the 16 lanes across) times 1 / sum, transposed into
 * the lanes' output rows. */
static inline void store_output(const float *o_t, const QueryLanes *lanes, const float inverse[16], int d0) {
    __m512i block[16];
    for (int j = 0; j < 16; j++) block[j] = _mm512_loadu_si512((const void *)(o_t + 16 * (d0 + j)));
    transpose_16x16(block); /* block[i]: query i's 16 dimensions */
    for (int i = 0; i < 16; i++)
        if (lanes->out_row[i])
            _mm512_storeu_ps(lanes->out_row[i] + d0, _mm512_mul_ps(_mm512_castsi512_ps(block[i]), _mm512_set1_ps(inverse[i])));
}

/* Keys per block of the online softmax (a multiple of 64: the score tiles go two or four 16-key
 * blocks at a time, the weights 32 keys a tile): two query blocks' scores 128 KiB, their weights
 * 64 KiB, the key and V^T tiles of 64 dimensions 256 KiB, together in L2. */
#ifndef KEY_BLOCK
#define KEY_BLOCK 1024
#endif
/* Work items take ITEM_GROUP sub-items of `blocks_per_item` blocks of 16 query rows each, and go
 * over the keys one key block at a time for all of them: the block's key and V^T tiles are read
 * from L2 by every sub-item (from beyond it once), where each sub-item going over all the keys
 * read every tile of a long context again (a 512-token chunk after 7,680 cached tokens: 0.63
 * TFLOP/s, against 0.92 after 1,536). */
#ifndef ITEM_GROUP
#define ITEM_GROUP 8
#endif
/* The longest key block: a last one of up to half KEY_BLOCK joins the block before it. */
#define MAX_BLOCK_KEYS (KEY_BLOCK + KEY_BLOCK / 2)

/* Query blocks (of 16 rows) an item takes: two where the weights are one bfloat16 each, so every
 * key and value tile loaded from L2 feeds two products (the tile products waited on those
 * loads: from L1 they ran about 3x faster); one with split halves, whose high and low tiles
 * leave no registers for a second block. */
static inline int blocks_per_item(const Problem *p) { return p->split ? 1 : 2; }

/* Items of one KV head of a chunk: its length x group query rows in blocks of 16, so many a time. */
static inline long items_per_head(const Problem *p, const int64_t *chunk) {
    const long rows_per_item = 16L * blocks_per_item(p) * ITEM_GROUP;
    return (chunk[CHUNK_LENGTH] * (p->heads / p->kv_heads) + rows_per_item - 1) / rows_per_item;
}

/* A sub-item's softmax state between key blocks: its lanes, Q^T tiles, running lane maxima and
 * sums, and O^T (a dimension per row, a lane per query) in memory, rescaled by 2^(c old max - c new
 * max) per lane before each key block's products add to it (the accumulator tiles cannot be
 * rescaled in place). */
typedef struct {
    QueryLanes lanes[2];
    int blocks;
    long keys;
    __m512 best[2], total[2];
    __m512i limits[2];
    uint16_t *q_high[2], *q_low;
    float *o_t[2];
} QueryState;

static void query_state(const Problem *p, const int64_t *chunk, int kv_head, long first, int blocks, uint16_t *q_memory,
                        float *o_memory, QueryState *st) {
    const int steps = p->head_dim / 32;
    st->keys = 0;
    for (int b = 0; b < blocks; b++) {
        query_lanes(p, chunk, kv_head, first + 16 * b, &st->lanes[b]);
        if (st->lanes[b].keys > st->keys) st->keys = st->lanes[b].keys;
        st->limits[b] = _mm512_load_si512((const void *)st->lanes[b].limit);
        st->best[b] = _mm512_set1_ps(-INFINITY);
        st->total[b] = _mm512_setzero_ps();
    }
    if (blocks == 2 && st->lanes[1].keys == 0) blocks = 1; /* past the chunk's last row */
    st->blocks = blocks;
    st->q_high[0] = q_memory, st->q_high[1] = q_memory + steps * 512, st->q_low = q_memory + 2 * steps * 512;
    st->o_t[0] = o_memory, st->o_t[1] = o_memory + p->head_dim * 16;
    for (int b = 0; b < blocks; b++) query_tiles(&st->lanes[b], steps, st->q_high[b], p->split ? st->q_low : NULL);
    memset(o_memory, 0, sizeof(float) * (size_t)(blocks * p->head_dim * 16));
}

/* One sub-item's keys first_key .. end_key - 1 (those it sees). Tiles: scores and
 * outputs in tmm0-3; keys and V^T (A) in tmm4 / tmm6, queries and weights (B) in tmm5 / tmm7.
 * scores, p_high and p_low: one key block's worth, shared by the sub-items in turn. */
static void query_key_block(const Problem *p, QueryState *st, long first_key, long end_key, const uint16_t *key_high,
                            const uint16_t *key_low, const uint16_t *vt_high, const uint16_t *vt_low, float *scores[2],
                            uint16_t *p_high[2], uint16_t *p_low) {
    const int split = p->split, d = p->head_dim, steps = d / 32, blocks = st->blocks;
    uint16_t *const *q_high = st->q_high, *q_low = st->q_low;
    const long block_keys = (st->keys < end_key ? st->keys : end_key) - first_key;
    const long pair_blocks = (block_keys + 31) / 32, score_blocks = pair_blocks * 2, first_score = first_key / 16;
    const float c = p->scale * 1.4426950408889634f;
    /* S^T = K Q^T, four C tiles at a time (four independent sums keep the tile unit busy): four
     * key blocks against one query block, or two against two. Each lane's maximum over the
     * previous tiles' scores is taken while the tile unit multiplies the next. */
    const long key_group = blocks == 2 ? 2 : 4;
    __m512 block_best[2] = {st->best[0], st->best[1]};
    for (long local = 0; local < score_blocks; local += key_group) {
        const long block = first_score + local;
        const long count = score_blocks - local < key_group ? score_blocks - local : key_group;
        zero_c_tiles();
        for (int step = 0; step < steps; step++) {
            if (blocks == 2) { /* tile 2 b + k: query block b, key block block + k */
                _tile_loadd(5, q_high[0] + step * 512, 64);
                _tile_loadd(7, q_high[1] + step * 512, 64);
                _tile_loadd(4, key_high + (block * steps + step) * 512, 64);
                _tile_dpbf16ps(0, 4, 5);
                _tile_dpbf16ps(2, 4, 7);
                if (count > 1) {
                    _tile_loadd(6, key_high + ((block + 1) * steps + step) * 512, 64);
                    _tile_dpbf16ps(1, 6, 5);
                    _tile_dpbf16ps(3, 6, 7);
                }
            } else {
                _tile_loadd(5, q_high[0] + step * 512, 64);
                if (split) _tile_loadd(7, q_low + step * 512, 64);
                KEYS_INTO(0, 4)
                KEYS_INTO(1, 6)
                KEYS_INTO(2, 4)
                KEYS_INTO(3, 6)
            }
        }
        for (int b = 0; local && b < blocks; b++)
            block_best[b] = lane_maximum(scores[b], first_key, (block - key_group) * 16, block * 16, st->lanes[b].keys,
                                         st->lanes[b].least_limit, st->limits[b], block_best[b]);
        for (int b = 0; b < blocks; b++)
            for (int k = 0; k < count; k++)
                store_c_tile(blocks == 2 ? 2 * b + k : k, scores[b] + (local + k) * 256, 64);
    }
    const long last_group = first_score + (score_blocks - 1) / key_group * key_group;
    for (int b = 0; b < blocks; b++) {
        block_best[b] = lane_maximum(scores[b], first_key, last_group * 16, (first_score + score_blocks) * 16,
                                     st->lanes[b].keys, st->lanes[b].least_limit, st->limits[b], block_best[b]);
        if (first_key) {
            /* lanes that have seen no key (none with a query: key 0 is every query's) keep a
             * scale of 0 rather than 2^(-inf + inf) */
            const __mmask16 seen = _mm512_cmp_ps_mask(block_best[b], _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            const __m512 rescale = _mm512_maskz_mov_ps(
                seen, exp2_nonpositive16(_mm512_mul_ps(_mm512_sub_ps(st->best[b], block_best[b]), _mm512_set1_ps(c))));
            for (int j = 0; j < d; j++)
                _mm512_storeu_ps(st->o_t[b] + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(st->o_t[b] + 16 * j), rescale));
            st->total[b] = _mm512_mul_ps(st->total[b], rescale);
        }
        st->best[b] = block_best[b];
        st->total[b] = _mm512_add_ps(st->total[b], softmax_weights(scores[b], first_key, pair_blocks, &st->lanes[b],
                                                                   st->best[b], p->scale, p_high[b], split ? p_low : NULL));
    }
    /* O^T += V^T P^T: 64 dimensions (four C tiles) of one query block at a time, or 32 of two. */
    const int dims_per_pass = blocks == 2 ? 32 : 64;
    for (int d0 = 0; d0 < d; d0 += dims_per_pass) {
        const int tiles_now = (d - d0) / 16 < 4 ? (d - d0) / 16 : 4;
        if (blocks == 2) {
            for (int t = 0; t < 4; t++) start_c_tile(t, st->o_t[t / 2] + 16 * (d0 + 16 * (t % 2)));
        } else {
            for (int t = 0; t < tiles_now; t++) start_c_tile(t, st->o_t[0] + 16 * (d0 + 16 * t));
        }
        for (long local_pair = 0; local_pair < pair_blocks; local_pair++) {
            const long pair_block = first_key / 32 + local_pair;
            if (blocks == 2) { /* tile 2 b + g: query block b, dimensions d0 + 16 g */
                const long tile = (pair_block * (d / 16) + d0 / 16) * 512;
                _tile_loadd(5, p_high[0] + local_pair * 512, 64);
                _tile_loadd(7, p_high[1] + local_pair * 512, 64);
                _tile_loadd(4, vt_high + tile, 64);
                _tile_dpbf16ps(0, 4, 5);
                _tile_dpbf16ps(2, 4, 7);
                _tile_loadd(6, vt_high + tile + 512, 64);
                _tile_dpbf16ps(1, 6, 5);
                _tile_dpbf16ps(3, 6, 7);
            } else {
                _tile_loadd(5, p_high[0] + local_pair * 512, 64);
                if (split) _tile_loadd(7, p_low + local_pair * 512, 64);
                VALUES_INTO(0, 4)
                VALUES_INTO(1, 6)
                VALUES_INTO(2, 4)
                VALUES_INTO(3, 6)
            }
        }
        if (blocks == 2) {
            for (int t = 0; t < 4; t++) store_c_tile(t, st->o_t[t / 2] + 16 * (d0 + 16 * (t % 2)), 64);
        } else {
            for (int t = 0; t < tiles_now; t++) store_c_tile(t, st->o_t[0] + 16 * (d0 + 16 * t), 64);
        }
    }
}

/* One work item: up to ITEM_GROUP sub-items of `blocks` (1 or 2) blocks of 16 query rows from row
 * `first` of a chunk's KV head, the keys a block at a time for all of them. scratch:
 * query_scratch_floats(...) floats. */
static void query_item(const Problem *p, const int64_t *chunk, int kv_head, long first, int blocks, const uint16_t *tiles,
                       float *scratch) {
    const int split = p->split, d = p->head_dim, steps = d / 32;
    const long padded = padded_keys(chunk);
    const uint16_t *key_high = tiles, *key_low = tiles + padded * d;
    const uint16_t *vt_high = tiles + (split ? 2 : 1) * padded * d, *vt_low = vt_high + padded * d;
    /* scratch: scores per query block (one key block), then uint16 weights high per block and
     * low; per sub-item its Q^T tiles (uint16, three sets) and O^T (two blocks of d x 16 float32) */
    const long block_scores = MAX_BLOCK_KEYS / 16, block_pairs = MAX_BLOCK_KEYS / 32;
    float *scores[2] = {scratch, scratch + block_scores * 256};
    uint16_t *p_high[2] = {(uint16_t *)(scores[1] + block_scores * 256), NULL}, *p_low;
    p_high[1] = p_high[0] + block_pairs * 512, p_low = p_high[1] + block_pairs * 512;
    float *states_memory = (float *)(p_low + block_pairs * 512);
    const long state_floats = 3 * steps * 512 / 2 + 2 * d * 16;
    QueryState states[ITEM_GROUP];
    int count = 0;
    long keys = 0;
    for (int g = 0; g < ITEM_GROUP; g++) {
        const long sub_first = first + (long)g * 16 * blocks;
        if (sub_first >= chunk[CHUNK_LENGTH] * (p->heads / p->kv_heads)) break;
        float *memory = states_memory + g * state_floats;
        query_state(p, chunk, kv_head, sub_first, blocks, (uint16_t *)(memory + 2 * d * 16), memory, &states[g]);
        if (states[g].keys > keys) keys = states[g].keys;
        count++;
    }
    for (long first_key = 0, end_key; first_key < keys; first_key = end_key) {
        /* a last block of up to half KEY_BLOCK joins the one before (MAX_BLOCK_KEYS): a block
         * costs a rescale of each O^T, and one of 1,280 keys as two took StarChat-beta's heads 6%
         * longer than the two-pass kernel */
        end_key = keys - first_key <= MAX_BLOCK_KEYS ? keys : first_key + KEY_BLOCK;
        for (int g = 0; g < count; g++)
            if (states[g].keys > first_key)
                query_key_block(p, &states[g], first_key, end_key, key_high, key_low, vt_high, vt_low, scores, p_high, p_low);
    }
    for (int g = 0; g < count; g++)
        for (int b = 0; b < states[g].blocks; b++) {
            float inverse[16];
            _mm512_storeu_ps(inverse, _mm512_div_ps(_mm512_set1_ps(1.0f), states[g].total[b]));
            for (int d0 = 0; d0 < d; d0 += 16) store_output(states[g].o_t[b], &states[g].lanes[b], inverse, d0);
        }
}

/* Floats of scratch query_item needs: scores and weights for one key block of KEY_BLOCK, and its
 * sub-items' states. */
static long query_scratch_floats(int head_dim) {
    const long pair_blocks = MAX_BLOCK_KEYS / 32;
    return 2 * pair_blocks * 32 * 16 + 3 * pair_blocks * 512 / 2 + ITEM_GROUP * (3 * (head_dim / 32) * 512 / 2 + 2 * head_dim * 16) + 16;
}
#endif

int starchat_prompt_attention(const float *q, long q_stride, const int64_t *chunks, long num_chunks, int heads, int kv_heads,
                              int head_dim, float scale, int split, float *out, long out_stride, int threads) {
#if HAVE_AMX
    if (!starchat_amx_ready() || head_dim % 32 || kv_heads <= 0 || heads % kv_heads || !(scale > 0.0f)) return 1;
    for (long c = 0; c < num_chunks; c++) {
        const long type = chunks[c * CHUNK_FIELDS + CHUNK_KV_TYPE];
        if (type != W_F32 && type != W_F16 && type != W_BF16) return 1;
    }
    Problem p = {chunks, num_chunks, heads, kv_heads, head_dim, split, scale, q, q_stride, out, out_stride,
                 NULL, NULL, NULL, NULL};
    long *offsets = (long *)malloc(sizeof(long) * (3 * num_chunks + 2));
    if (!offsets) return -2;
    p.tile_offsets = offsets, p.prepare_items = offsets + num_chunks, p.query_items = offsets + 2 * num_chunks + 1;
    long tile_values = 0;
    p.prepare_items[0] = p.query_items[0] = 0;
    for (long c = 0; c < num_chunks; c++) {
        const int64_t *chunk = chunks + c * CHUNK_FIELDS;
        p.tile_offsets[c] = tile_values;
        tile_values += kv_heads * head_tile_values(&p, chunk);
        p.prepare_items[c + 1] = p.prepare_items[c] + kv_heads * (padded_keys(chunk) / 32);
        p.query_items[c + 1] = p.query_items[c] + kv_heads * items_per_head(&p, chunk);
    }
    p.tiles = (uint16_t *)malloc((size_t)tile_values * sizeof(uint16_t) + 64);
    if (!p.tiles) {
        free(offsets);
        return -2;
    }
    const long scratch_floats = query_scratch_floats(head_dim);
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scratch = starchat_thread_scratch(scratch_floats, &failed);
        if (!failed) {
#pragma omp for schedule(static)
            for (long item = 0; item < p.prepare_items[num_chunks]; item++) {
                const long c = chunk_of(p.prepare_items, num_chunks, item), within = item - p.prepare_items[c];
                const int64_t *chunk = chunks + c * CHUNK_FIELDS;
                const long blocks = padded_keys(chunk) / 32;
                const int kv_head = (int)(within / blocks);
                prepare_block(&p, chunk, kv_head, within % blocks * 32,
                              p.tiles + p.tile_offsets[c] + kv_head * head_tile_values(&p, chunk));
            }
            configure_tiles();
            /* The longest blocks (last in each chunk: the most keys) first, shared out as threads
             * come free: the causal blocks differ in cost. */
#pragma omp for schedule(dynamic, 1)
            for (long reversed = 0; reversed < p.query_items[num_chunks]; reversed++) {
                const long item = p.query_items[num_chunks] - 1 - reversed;
                const long c = chunk_of(p.query_items, num_chunks, item), within = item - p.query_items[c];
                const int64_t *chunk = chunks + c * CHUNK_FIELDS;
                const long items = items_per_head(&p, chunk);
                const int kv_head = (int)(within / items), blocks = blocks_per_item(&p);
                query_item(&p, chunk, kv_head, within % items * 16 * blocks * ITEM_GROUP, blocks,
                           p.tiles + p.tile_offsets[c] + kv_head * head_tile_values(&p, chunk), scratch);
            }
            _tile_release();
        }
        free(scratch);
    }
    free(p.tiles);
    free(offsets);
    return failed ? -2 : 0;
#else
    (void)q; (void)q_stride; (void)chunks; (void)num_chunks; (void)heads; (void)kv_heads; (void)head_dim; (void)scale;
    (void)split; (void)out; (void)out_stride; (void)threads;
    return 1;
#endif
}
