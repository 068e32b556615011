/* One GPTBigCode block for a step of decodes only (one new token per sequence), in one call:
 *
 *     hidden += c_proj(attention(c_attn(ln_1(hidden))))      keys/values written to the cache
 *     hidden += mlp_c_proj(gelu(c_fc(ln_2(hidden))))
 *
 * The same arithmetic as the module path (gpt_bigcode.py: layer norms, products, attention,
 * residuals), but one OpenMP region per block instead of a dozen PyTorch operations and their
 * dispatch, which on a CPU cost as much as the attention itself. The residual stream and all
 * intermediates are float32 whatever the weight type; the cache keeps its own dtype.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "vector_math.h"

/* A Linear layer: weight (n, k) of wtype, float32 scales (int8 only) and bias (may be NULL). */
typedef struct {
    const void *weight;
    int wtype;
    const float *scales, *bias;
} Linear;

/* Everything one block needs; Python fills it once per layer (weights) and per step (the rest). */
typedef struct {
    long rows, embed, inner, qkv;           /* qkv = embed + 2 * kv_heads * head_dim */
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
    float eps;
    Linear c_attn, attn_proj, c_fc, mlp_proj;
    int gelu_tanh;                          /* 1: tanh approximation, 0: exact erf */
    void *cache_keys, *cache_values;        /* (num_slots, kv_dim) */
    int cache_type;
    const int64_t *write_slots;             /* (rows,) where each new token's key/value go */
    const int64_t *read_slots;              /* (rows, max_len) */
    const float *mask;                      /* (rows, max_len) additive */
    long max_len;
    int heads, kv_heads, head_dim;
    float scale;
} Block;

static void layer_norm_rows(const float *x, long rows, long width, const float *weight, const float *bias, float eps,
                            float *out) {
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *yr = out + r * width;
        double sum = 0.0, squares = 0.0;
        for (long i = 0; i < width; i++) sum += xr[i];
        float mean = (float)(sum / width);
        for (long i = 0; i < width; i++) squares += (double)(xr[i] - mean) * (xr[i] - mean);
        float inverse = 1.0f / sqrtf((float)(squares / width) + eps);
        for (long i = 0; i < width; i++) yr[i] = (xr[i] - mean) * inverse * weight[i] + bias[i];
    }
}

static void store_cache_row(void *cache, int type, long slot, long width, const float *row) {
    for (long i = 0; i < width; i++) store_as(cache, type, slot * width + i, row[i]);
}

static inline float gelu(float x, int tanh_approximation) {
    if (tanh_approximation) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

/* x = gelu(x) over `count` floats, shared among the threads (orphaned work-sharing loop). */
static void gelu_rows(float *x, long count, int tanh_approximation) {
    const long chunk = 512, chunks = (count + chunk - 1) / chunk;
#pragma omp for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * chunk, end = i + chunk < count ? i + chunk : count;
#if defined(__AVX2__) && defined(__FMA__)
        if (tanh_approximation) /* scalar tanhf costs about as much as a layer's attention */
            for (; i + 8 <= end; i += 8) _mm256_storeu_ps(x + i, gelu_tanh8(_mm256_loadu_ps(x + i)));
#endif
        for (; i < end; i++) x[i] = gelu(x[i], tanh_approximation);
    }
}

static void product(const float *x, const Block *b, const Linear *layer, float *y, long n, long k) {
    Output out = {y, W_F32, n, layer->scales, layer->bias};
    starchat_linear_columns(x, b->rows, layer->weight, layer->wtype, &out, n, k);
}

/* hidden: (rows, embed) float32, updated in place. scratch: rows * (2 * embed + qkv +
 * max(inner, embed)) floats. Returns 0, or -2 when out of memory. */
int starchat_decode_block(const Block *b, float *hidden, float *scratch, int threads) {
    long rows = b->rows, embed = b->embed, kv_dim = (long)b->kv_heads * b->head_dim;
    float *normed = scratch, *qkv = normed + rows * embed, *attended = qkv + rows * b->qkv;
    float *wide = attended + rows * embed; /* rows x max(inner, embed) */
    threads = threads > 0 ? threads : 1;
    long attention_floats = starchat_attention_scratch(rows, b->max_len, b->heads, b->kv_heads, b->head_dim, threads);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *attention_scratch = (float *)malloc((size_t)attention_floats * sizeof(float));
        if (!attention_scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            layer_norm_rows(hidden, rows, embed, b->ln1_weight, b->ln1_bias, b->eps, normed);
            product(normed, b, &b->c_attn, qkv, b->qkv, embed);
            /* The new tokens' keys and values go to the cache before attention reads it. */
#pragma omp for schedule(static)
            for (long r = 0; r < rows; r++) {
                store_cache_row(b->cache_keys, b->cache_type, b->write_slots[r], kv_dim, qkv + r * b->qkv + embed);
                store_cache_row(b->cache_values, b->cache_type, b->write_slots[r], kv_dim, qkv + r * b->qkv + embed + kv_dim);
            }
            /* Queries are the first `embed` columns of each qkv row: compact them (row stride). */
#pragma omp for schedule(static)
            for (long r = 0; r < rows; r++)
                for (long i = 0; i < embed; i++) normed[r * embed + i] = qkv[r * b->qkv + i];
            starchat_attention_items(normed, W_F32, b->cache_keys, b->cache_values, b->cache_type, b->read_slots, b->mask, rows,
                                     b->max_len, b->heads, b->kv_heads, b->head_dim, b->scale, attended, threads,
                                     attention_scratch);
            product(attended, b, &b->attn_proj, wide, embed, embed);
#pragma omp for schedule(static)
            for (long i = 0; i < rows * embed; i++) hidden[i] += wide[i];
            layer_norm_rows(hidden, rows, embed, b->ln2_weight, b->ln2_bias, b->eps, normed);
            product(normed, b, &b->c_fc, wide, b->inner, embed);
            gelu_rows(wide, rows * b->inner, b->gelu_tanh);
            product(wide, b, &b->mlp_proj, attended, embed, b->inner);
#pragma omp for schedule(static)
            for (long i = 0; i < rows * embed; i++) hidden[i] += attended[i];
        }
        free(attention_scratch);
    }
    return failed ? -2 : 0;
}
