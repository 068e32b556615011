/* Decode attention on a slot-addressed KV cache: one new query token per sequence.
 *
 * For sequence b, query head h (of `heads`, grouped over `kv_heads`), and the cached tokens
 * l < max_len whose mask is finite:
 *     out[b, h] = softmax_l(scale * q[b, h] . K[slots[b, l]] + mask[b, l]) @ V[slots[b, l]]
 * read straight from the cache rows (no gathered copy, the single multi-query head is never
 * expanded), in float32 whatever the storage type. One call per layer replaces a dozen small
 * PyTorch operations, which cost more than the arithmetic at these sizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

static inline void widen(const void *row, int type, long count, float *out) {
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

/* All query heads of one KV head for one sequence: each key/value row is widened once and used
 * by every head of the group. `scratch` holds group * (max_len + 2 * head_dim) + 2 * head_dim floats. */
static void group_attention(const void *query, int io_type, const void *keys, const void *values, int type, const int64_t *slots,
                            const float *mask, long max_len, long kv_dim, int group, int head_dim, int kv_head,
                            float scale, void *out, long q_offset, float *scratch) {
    float *scores = scratch;                                   /* group x max_len */
    float *q = scores + (long)group * max_len;                 /* group x head_dim */
    float *acc = q + (long)group * head_dim;                   /* group x head_dim */
    float *row = acc + (long)group * head_dim;                 /* head_dim */
    for (int g = 0; g < group; g++) widen((const char *)query + (q_offset + (long)g * head_dim) * element_size(io_type), io_type, head_dim, q + g * head_dim);
    long key_offset = (long)kv_head * head_dim;
    float best[group];
    for (int g = 0; g < group; g++) best[g] = -INFINITY;
    for (long l = 0; l < max_len; l++) {
        if (isinf(mask[l]) && mask[l] < 0) continue;
        widen((const char *)keys + (slots[l] * kv_dim + key_offset) * element_size(type), type, head_dim, row);
        for (int g = 0; g < group; g++) {
            float dot = 0.0f;
            const float *qg = q + g * head_dim;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < head_dim; d++) dot += qg[d] * row[d];
            float score = dot * scale + mask[l];
            scores[g * max_len + l] = score;
            if (score > best[g]) best[g] = score;
        }
    }
    float total[group];
    for (int g = 0; g < group; g++) {
        total[g] = 0.0f;
        for (int d = 0; d < head_dim; d++) acc[g * head_dim + d] = 0.0f;
    }
    for (long l = 0; l < max_len; l++) {
        if (isinf(mask[l]) && mask[l] < 0) continue;
        widen((const char *)values + (slots[l] * kv_dim + key_offset) * element_size(type), type, head_dim, row);
        for (int g = 0; g < group; g++) {
            float weight = expf(scores[g * max_len + l] - best[g]);
            total[g] += weight;
            float *ag = acc + g * head_dim;
#pragma omp simd
            for (int d = 0; d < head_dim; d++) ag[d] += weight * row[d];
        }
    }
    for (int g = 0; g < group; g++) {
        float inverse = total[g] > 0.0f ? 1.0f / total[g] : 0.0f; /* all masked: zeros, not NaN */
        for (int d = 0; d < head_dim; d++) store_as(out, io_type, q_offset + (long)g * head_dim + d, acc[g * head_dim + d] * inverse);
    }
}

/* How the work is cut: items are (sequence, KV head, part of the group). With fewer
 * (sequence, KV head) pairs than threads (one multi-query sequence), the group's heads are split
 * into one part per thread, each widening the shared key/value rows once. */
static void work_split(long batch, int heads, int kv_heads, int threads, int *split, int *per_item) {
    int group = heads / kv_heads;
    *split = (batch * kv_heads < threads) ? (threads < group ? threads : group) : 1;
    *per_item = (group + *split - 1) / *split;
}

long starchat_attention_scratch(long batch, long max_len, int heads, int kv_heads, int head_dim, int threads) {
    int split, per_item;
    work_split(batch, heads, kv_heads, threads, &split, &per_item);
    return (long)per_item * (max_len + 2 * head_dim) + head_dim;
}

void starchat_attention_items(const void *query, int io_type, const void *keys, const void *values, int type, const int64_t *slots,
                              const float *mask, long batch, long max_len, int heads, int kv_heads, int head_dim,
                              float scale, void *out, int threads, float *scratch) {
    int group = heads / kv_heads, split, per_item;
    long kv_dim = (long)kv_heads * head_dim;
    work_split(batch, heads, kv_heads, threads, &split, &per_item);
#pragma omp for schedule(static)
    for (long item = 0; item < batch * kv_heads * split; item++) {
        long b = item / (kv_heads * split), rest = item % (kv_heads * split);
        int kv_head = (int)(rest / split), part = (int)(rest % split);
        int first = part * per_item, count = group - first < per_item ? group - first : per_item;
        if (count <= 0) continue;
        long q_offset = b * (long)heads * head_dim + ((long)kv_head * group + first) * head_dim;
        group_attention(query, io_type, keys, values, type, slots + b * max_len, mask + b * max_len, max_len, kv_dim,
                        count, head_dim, kv_head, scale, out, q_offset, scratch);
    }
}

/* query, out: (batch, heads * head_dim); keys, values: (num_slots, kv_heads * head_dim), all of
 * `type` (W_F32, W_F16 or W_BF16); slots: (batch, max_len); mask: (batch, max_len) additive.
 * Returns 0, -1 for a bad type or shape, -2 when out of memory. */
int starchat_decode_attention(const void *query, int io_type, const void *keys, const void *values, int type,
                              const int64_t *slots, const float *mask, long batch, long max_len, int heads, int kv_heads,
                              int head_dim, float scale, void *out, int threads) {
    if (type < W_F32 || type > W_BF16 || io_type < W_F32 || io_type > W_BF16 || kv_heads <= 0 || heads % kv_heads ||
        head_dim <= 0)
        return -1;
    threads = threads > 0 ? threads : 1;
    long scratch_floats = starchat_attention_scratch(batch, max_len, heads, kv_heads, head_dim, threads);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = (float *)malloc((size_t)scratch_floats * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed)
            starchat_attention_items(query, io_type, keys, values, type, slots, mask, batch, max_len, heads, kv_heads,
                                     head_dim, scale, out, threads, scratch);
        free(scratch);
    }
    return failed ? -2 : 0;
}
