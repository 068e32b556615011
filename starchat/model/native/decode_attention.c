/* Decode attention on a slot-addressed KV cache: one new query token per sequence.
 *
 * For sequence b, query head h (of `heads`, grouped over `kv_heads`), and the cached tokens
 * l < max_len whose mask is finite:
 *     out[b, h] = softmax_l(scale * q[b, h] . K[slots[b, l]] + mask[b, l]) @ V[slots[b, l]]
 * read straight from the cache rows (no gathered copy, the single multi-query head is never
 * expanded), in float32 whatever the storage type. One call per layer replaces a dozen small
 * PyTorch operations, which cost more than the arithmetic at these sizes. Where AMX tiles are
 * granted, 16-bit caches with 4+ query heads per KV head take amx.c's tiles instead
 * (starchat_amx_attention: bfloat16 queries and weights over a bfloat16 cache, split halves over
 * a float16 one).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vector_math.h"

static inline int masked(const float *mask, long l) { return isinf(mask[l]) && mask[l] < 0; }

/* A 16-bit cache's attention runs on AMX tiles (where granted) from this many query heads per KV
 * head: the tiles take 16 heads at once. */
#define AMX_ATTENTION_MIN_HEADS 4

/* head_dim cache values from element `offset` on, as float32; a zero row for masked positions,
 * whose slots need not hold anything. */
static inline void cache_row(const void *cache, int type, long offset, int head_dim, int skip, float *out) {
    if (skip) {
        for (int d = 0; d < head_dim; d++) out[d] = 0.0f;
        return;
    }
    widen_to_float32((const char *)cache + offset * element_size(type), type, head_dim, out);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ATTENTION_AVX2 1
/* The dot products of q with 8 rows (row-major, head_dim apart): lane i = q . rows[i]. The
 * partial sums stay in vectors and one add tree reduces all eight (no horizontal sum per row). */
static inline __m256 dot8(const float *q, const float *rows, int head_dim) {
    __m256 a[8];
#if defined(__AVX512F__)
    if (head_dim % 16 == 0) { /* 16-wide partial sums, folded to 8 lanes before the add tree */
        __m512 wide[8];
        for (int i = 0; i < 8; i++) wide[i] = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; d += 16) {
            __m512 qv = _mm512_loadu_ps(q + d);
            for (int i = 0; i < 8; i++) wide[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows + i * head_dim + d), wide[i]);
        }
        for (int i = 0; i < 8; i++) a[i] = _mm256_add_ps(_mm512_castps512_ps256(wide[i]), _mm512_extractf32x8_ps(wide[i], 1));
    } else
#endif
    {
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int d = 0; d < head_dim; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows + i * head_dim + d), a[i]);
        }
    }
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

#if defined(__AVX512F__)
/* acc[h][0..16) = sum_l weights[h * stride + l] * values[l * head_dim + c ..], for HEADS heads. */
static inline __attribute__((always_inline)) void weighted_values16(const float *weights, long stride, const float *values,
                                                                      long length, int head_dim, int c, int HEADS, __m512 *acc) {
    for (int h = 0; h < HEADS; h++) acc[h] = _mm512_setzero_ps();
    for (long l = 0; l < length; l++) {
        __m512 v = _mm512_loadu_ps(values + l * head_dim + c);
        for (int h = 0; h < HEADS; h++) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(weights[h * stride + l]), v, acc[h]);
    }
}
#endif

/* acc[h][0..8) = sum_l weights[h * stride + l] * values[l * head_dim + c ..], for HEADS heads. */
static inline __attribute__((always_inline)) void weighted_values(const float *weights, long stride, const float *values,
                                                                    long length, int head_dim, int c, int HEADS, __m256 *acc) {
    for (int h = 0; h < HEADS; h++) acc[h] = _mm256_setzero_ps();
    for (long l = 0; l < length; l++) {
        __m256 v = _mm256_loadu_ps(values + l * head_dim + c);
        for (int h = 0; h < HEADS; h++) acc[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + h * stride + l), v, acc[h]);
    }
}
#else
#define ATTENTION_AVX2 0
#endif

/* Calls CALL(n) with n = heads (1-8) as a constant: constant head counts keep the accumulators
 * in registers. */
#define WITH_HEAD_COUNT(heads, CALL)                                   \
    switch (heads) {                                                   \
    case 8: CALL(8); break;                                            \
    case 7: CALL(7); break;                                            \
    case 6: CALL(6); break;                                            \
    case 5: CALL(5); break;                                            \
    case 4: CALL(4); break;                                            \
    case 3: CALL(3); break;                                            \
    case 2: CALL(2); break;                                            \
    default: CALL(1); break;                                           \
    }
#define WEIGHTED_VALUES8(n) weighted_values(scores + (long)g * max_len, max_len, rows, max_len, head_dim, c, n, acc)
#define WEIGHTED_VALUES16(n) weighted_values16(scores + (long)g * max_len, max_len, rows, max_len, head_dim, c, n, acc)

/* Where an item's heads go: output rows of `type` from `offset` on, normalised; or, for a part of
 * a long row's keys (stats not NULL), float32 sums left unnormalised, with each head's maximum
 * score and sum of weights in stats[2h], stats[2h + 1], for merge_parts. */
typedef struct {
    void *out;
    int type;
    long offset;
    float *stats;
} Destination;

/* All query heads of one KV head for one sequence (the query's heads from element q_offset on)
 * over `max_len` keys; every key/value row is widened once and used by every head of the group.
 * `scratch`: starchat_attention_scratch(...) floats. */
static void group_attention(const void *query, int io_type, long q_offset, const void *keys, const void *values, int type,
                            const int64_t *slots, const float *mask, long max_len, long kv_dim, int group, int head_dim,
                            int kv_head, float scale, Destination to, float *scratch) {
    float *scores = scratch;                                   /* group x max_len: scores, then weights */
    float *q = scores + (long)group * max_len;                 /* group x head_dim */
    float *rows = q + (long)group * head_dim;                  /* max_len x head_dim widened keys, then values */
    float *best = rows + max_len * head_dim, *total = best + group;
    const long offset = (long)kv_head * head_dim;
    for (int g = 0; g < group; g++)
        widen_to_float32((const char *)query + (q_offset + (long)g * head_dim) * element_size(io_type), io_type, head_dim, q + g * head_dim);
    if ((type == W_BF16 || type == W_F16) && group >= AMX_ATTENTION_MIN_HEADS) {
        /* AMX tiles (amx.c), 16 query heads at a time: done there, or nothing done and the
         * vector code below runs. */
        float *result = best + 2 * group, *amx_scratch = result + (long)group * head_dim;
        int done = 1;
        for (int g = 0; g < group && done; g += 16)
            done = starchat_amx_attention(q + (long)g * head_dim, group - g < 16 ? group - g : 16, (const uint16_t *)keys,
                                          (const uint16_t *)values, type, kv_dim, offset, slots, mask, max_len, head_dim,
                                          scale, result + (long)g * head_dim, to.stats ? to.stats + 2 * g : NULL, amx_scratch);
        if (done) {
            if (to.type == W_F32)
                memcpy((float *)to.out + to.offset, result, (size_t)group * head_dim * sizeof(float));
            else
                for (long i = 0; i < (long)group * head_dim; i++) store_as(to.out, to.type, to.offset + i, result[i]);
            return;
        }
    }
    for (int g = 0; g < group; g++) best[g] = -INFINITY, total[g] = 0.0f;
    for (long l = 0; l < max_len; l++)
        cache_row(keys, type, slots[l] * kv_dim + offset, head_dim, masked(mask, l), rows + l * head_dim);

    /* Scores (masked positions: -inf) and their maximum per head. */
    long l = 0;
#if ATTENTION_AVX2
    if (head_dim % 8 == 0)
        for (; l + 8 <= max_len; l += 8) {
            __m256 bias = _mm256_loadu_ps(mask + l), factor = _mm256_set1_ps(scale);
            for (int g = 0; g < group; g++)
                _mm256_storeu_ps(scores + g * max_len + l, _mm256_fmadd_ps(dot8(q + g * head_dim, rows + l * head_dim, head_dim), factor, bias));
        }
#endif
    for (; l < max_len; l++)
        for (int g = 0; g < group; g++) {
            float dot = 0.0f;
            const float *qg = q + g * head_dim, *row = rows + l * head_dim;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < head_dim; d++) dot += qg[d] * row[d];
            scores[g * max_len + l] = dot * scale + mask[l];
        }
    /* Softmax weights, unnormalised: exp(score - max); a head with every position masked keeps
     * weights 0 and gives zeros, not NaN. */
    for (int g = 0; g < group; g++) {
        float *row = scores + g * max_len;
        for (long i = 0; i < max_len; i++) best[g] = row[i] > best[g] ? row[i] : best[g];
        if (isinf(best[g])) {
            for (long i = 0; i < max_len; i++) row[i] = 0.0f;
            continue;
        }
        long i = 0;
#if ATTENTION_AVX2
        __m256 sum = _mm256_setzero_ps(), shift = _mm256_set1_ps(best[g]);
        for (; i + 8 <= max_len; i += 8) {
            __m256 weight = exp_negative(_mm256_sub_ps(_mm256_loadu_ps(row + i), shift));
            _mm256_storeu_ps(row + i, weight);
            sum = _mm256_add_ps(sum, weight);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, sum);
        for (int lane = 0; lane < 8; lane++) total[g] += lanes[lane];
#endif
        for (; i < max_len; i++) {
            row[i] = masked(mask, i) ? 0.0f : expf(row[i] - best[g]);
            total[g] += row[i];
        }
    }
    for (l = 0; l < max_len; l++)
        cache_row(values, type, slots[l] * kv_dim + offset, head_dim, masked(mask, l), rows + l * head_dim);

    /* out[g] = weights[g] @ values / total[g] (a part: not divided, the maximum and total kept) */
    if (to.stats)
        for (int h = 0; h < group; h++) to.stats[2 * h] = best[h], to.stats[2 * h + 1] = total[h];
    int g = 0;
#if ATTENTION_AVX2 && defined(__AVX512F__)
    if (head_dim % 16 == 0)
        for (; g < group; g += 8) {
            int heads = group - g < 8 ? group - g : 8;
            for (int c = 0; c < head_dim; c += 16) {
                __m512 acc[8];
                WITH_HEAD_COUNT(heads, WEIGHTED_VALUES16)
                for (int h = 0; h < heads; h++) {
                    const float inverse = to.stats ? 1.0f : total[g + h] > 0.0f ? 1.0f / total[g + h] : 0.0f;
                    const __m512 result = _mm512_mul_ps(acc[h], _mm512_set1_ps(inverse));
                    const long at = to.offset + (long)(g + h) * head_dim + c;
                    if (to.type == W_F32) {
                        _mm512_storeu_ps((float *)to.out + at, result);
                    } else {
                        float lanes[16];
                        _mm512_storeu_ps(lanes, result);
                        for (int d = 0; d < 16; d++) store_as(to.out, to.type, at + d, lanes[d]);
                    }
                }
            }
        }
#endif
#if ATTENTION_AVX2
    if (head_dim % 8 == 0)
        for (; g < group; g += 8) {
            int heads = group - g < 8 ? group - g : 8;
            for (int c = 0; c < head_dim; c += 8) {
                __m256 acc[8];
                WITH_HEAD_COUNT(heads, WEIGHTED_VALUES8)
                for (int h = 0; h < heads; h++) {
                    float lanes[8], inverse = to.stats ? 1.0f : total[g + h] > 0.0f ? 1.0f / total[g + h] : 0.0f;
                    _mm256_storeu_ps(lanes, _mm256_mul_ps(acc[h], _mm256_set1_ps(inverse)));
                    for (int d = 0; d < 8; d++) store_as(to.out, to.type, to.offset + (long)(g + h) * head_dim + c + d, lanes[d]);
                }
            }
        }
#endif
    for (; g < group; g++) {
        float inverse = to.stats ? 1.0f : total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
        for (int d = 0; d < head_dim; d++) {
            float sum = 0.0f;
            for (long i = 0; i < max_len; i++) sum += scores[g * max_len + i] * rows[i * head_dim + d];
            store_as(to.out, to.type, to.offset + (long)g * head_dim + d, sum * inverse);
        }
    }
}

/* A row's keys go in parts of KEY_PART (the last one up to twice that), each part an item of its
 * own whose unnormalised sums are merged after the others: a long context is shared among the
 * threads instead of running on one (or on all of them, each over every key, for a part of the
 * heads). The parts depend on the row's length alone, so a row's output is the same bits in any
 * batch and on any number of threads. */
#define KEY_PART 1024
static long key_parts(long length) { return length < 2 * KEY_PART ? 1 : length / KEY_PART; }

static inline long clamped_length(int64_t length, long max_len) { return length < 1 ? 1 : length > max_len ? max_len : length; }

long starchat_attention_partials(const int64_t *lengths, long batch, long max_len, int heads, int head_dim) {
    long floats = 0;
    for (long b = 0; b < batch; b++) {
        const long parts = key_parts(clamped_length(lengths[b], max_len));
        if (parts > 1) floats += parts * heads * (head_dim + 2);
    }
    return floats;
}

long starchat_attention_scratch(long max_len, int heads, int kv_heads, int head_dim) {
    const long group = heads / kv_heads;
    /* group_attention's regions, then the AMX path's result and scratch */
    return group * (max_len + head_dim + 2) + max_len * head_dim + group * head_dim +
           starchat_amx_attention_scratch(max_len, head_dim);
}

void starchat_attention_lengths(const float *mask, long batch, long max_len, int64_t *lengths) {
    for (long b = 0; b < batch; b++) {
        long length = max_len;
        while (length > 1 && masked(mask + b * max_len, length - 1)) length--;
        lengths[b] = length;
    }
}

/* One row's parts (`parts` blocks of heads x (head_dim + 2) floats: each head's sums, then its
 * maximum and total) into its output rows: each part rescaled to the largest maximum. */
static void merge_parts(const float *partials, long parts, int heads, int head_dim, void *out, int type, long offset) {
    const long stride = (long)heads * (head_dim + 2);
    const float *stats = partials + (long)heads * head_dim;
    for (int h = 0; h < heads; h++) {
        float best = -INFINITY, total = 0.0f, factor[parts];
        for (long p = 0; p < parts; p++) best = fmaxf(best, stats[p * stride + 2 * h]);
        for (long p = 0; p < parts; p++) {
            const float part_best = stats[p * stride + 2 * h];
            factor[p] = isinf(part_best) ? 0.0f : expf(part_best - best); /* a part with every key masked adds nothing */
            total += factor[p] * stats[p * stride + 2 * h + 1];
        }
        const float inverse = total > 0.0f ? 1.0f / total : 0.0f; /* every key masked: zeros */
        float sum[head_dim];
        for (int d = 0; d < head_dim; d++) sum[d] = 0.0f;
        for (long p = 0; p < parts; p++) {
            const float *part = partials + p * stride + (long)h * head_dim;
            for (int d = 0; d < head_dim; d++) sum[d] += factor[p] * part[d];
        }
        if (type == W_F32) {
            float *row = (float *)out + offset + (long)h * head_dim;
            for (int d = 0; d < head_dim; d++) row[d] = sum[d] * inverse;
        } else {
            for (int d = 0; d < head_dim; d++) store_as(out, type, offset + (long)h * head_dim + d, sum[d] * inverse);
        }
    }
}

void starchat_attention_items(const void *query, int io_type, const void *keys, const void *values, int type, const int64_t *slots,
                              const float *mask, const int64_t *lengths, long batch, long max_len, int heads, int kv_heads,
                              int head_dim, float scale, void *out, float *partials, float *scratch) {
    const int group = heads / kv_heads, thread = omp_get_thread_num(), team = omp_get_num_threads();
    const long kv_dim = (long)kv_heads * head_dim, part_floats = (long)heads * (head_dim + 2);
    /* Items are (row, KV head, part of the group's heads, part of the keys). With fewer (row, KV
     * head, key part) units than threads (one short multi-query row), the group's heads are split
     * into one part per thread, each widening the shared key/value rows once. */
    long units = 0;
    for (long b = 0; b < batch; b++) units += kv_heads * key_parts(clamped_length(lengths[b], max_len));
    const int split = units < team ? (team < group ? team : group) : 1, per_item = (group + split - 1) / split;
    /* Each thread takes a run of consecutive items of about equal work (its keys, plus a fixed
     * cost per item): with one long context among short ones, equal counts of rows left one
     * thread with the long row and half the short ones. Equal lengths give the equal shares of a
     * static schedule, the rows whose new keys and queries the same thread just wrote. */
    const long item_cost = 32;
    double work = 0.0;
    for (long b = 0; b < batch; b++) {
        const long length = clamped_length(lengths[b], max_len);
        work += (double)kv_heads * split * (length + item_cost * key_parts(length));
    }
    double before = 0.0;
    long partial_at = 0;
    for (long b = 0; b < batch; b++) {
        const long length = clamped_length(lengths[b], max_len), parts = key_parts(length);
        float *row_partials = parts > 1 ? partials + partial_at : NULL;
        partial_at += parts > 1 ? parts * part_floats : 0;
        for (long item = 0; item < kv_heads * split * parts; item++) {
            const long part = item % parts, first_key = part * KEY_PART;
            const long part_keys = part == parts - 1 ? length - first_key : KEY_PART;
            const double middle = before + 0.5 * (part_keys + item_cost);
            before += part_keys + item_cost;
            const int owner = (int)(middle * team / work);
            if ((owner < team ? owner : team - 1) != thread) continue;
            const int kv_head = (int)(item / parts / split), first = (int)(item / parts % split) * per_item;
            const int count = group - first < per_item ? group - first : per_item;
            if (count <= 0) continue;
            const long head = (long)kv_head * group + first, q_offset = (b * heads + head) * head_dim;
            Destination to = {out, io_type, q_offset, NULL};
            if (row_partials) {
                float *at = row_partials + part * part_floats;
                to = (Destination){at, W_F32, head * head_dim, at + (long)heads * head_dim + 2 * head};
            }
            group_attention(query, io_type, q_offset, keys, values, type, slots + b * max_len + first_key,
                            mask + b * max_len + first_key, part_keys, kv_dim, count, head_dim, kv_head, scale, to, scratch);
        }
    }
    if (partial_at) { /* the long rows' parts, merged once every thread has written its own */
#pragma omp barrier
        long at = 0, long_rows = 0;
        for (long b = 0; b < batch; b++) {
            const long parts = key_parts(clamped_length(lengths[b], max_len));
            if (parts == 1) continue;
            if (long_rows++ % team == thread) merge_parts(partials + at, parts, heads, head_dim, out, io_type, b * heads * head_dim);
            at += parts * part_floats;
        }
    }
#pragma omp barrier
}

/* query, out: (batch, heads * head_dim) of io_type; keys, values: (num_slots, kv_heads * head_dim)
 * of `type` (each W_F32, W_F16 or W_BF16); slots: (batch, max_len); mask: (batch, max_len) additive;
 * lengths: (batch,) each row's keys, the mask -inf from there on, or NULL: found in the mask.
 * Returns 0, -1 for a bad type or shape, -2 when out of memory. */
int starchat_decode_attention(const void *query, int io_type, const void *keys, const void *values, int type,
                              const int64_t *slots, const float *mask, const int64_t *given_lengths, long batch,
                              long max_len, int heads, int kv_heads, int head_dim, float scale, void *out, int threads) {
    if (type < W_F32 || type > W_BF16 || io_type < W_F32 || io_type > W_BF16 || kv_heads <= 0 || heads % kv_heads ||
        head_dim <= 0)
        return -1;
    threads = threads > 0 ? threads : 1;
    long scratch_floats = starchat_attention_scratch(max_len, heads, kv_heads, head_dim);
    int64_t *lengths = (int64_t *)malloc((size_t)(batch + 1) * sizeof(int64_t));
    if (!lengths) return -2;
    if (given_lengths)
        memcpy(lengths, given_lengths, (size_t)batch * sizeof(int64_t));
    else
        starchat_attention_lengths(mask, batch, max_len, lengths);
    float *partials = (float *)malloc((size_t)(starchat_attention_partials(lengths, batch, max_len, heads, head_dim) + 1) * sizeof(float));
    if (!partials) {
        free(lengths);
        return -2;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = starchat_thread_scratch(scratch_floats, &failed);
        if (!failed)
            starchat_attention_items(query, io_type, keys, values, type, slots, mask, lengths, batch, max_len, heads,
                                     kv_heads, head_dim, scale, out, partials, scratch);
        free(scratch);
    }
    free(lengths), free(partials);
    return failed ? -2 : 0;
}
