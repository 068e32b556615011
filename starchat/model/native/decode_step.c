/* A whole decode step in one call: one new token per sequence, from token ids to logits.
 *
 *     hidden = wte[token] + wpe[position]
 *     for each block:
 *         hidden += c_proj(attention(c_attn(ln_1(hidden))))      keys/values written to the cache
 *         hidden += mlp_c_proj(gelu(c_fc(ln_2(hidden))))
 *     logits = lm_head(ln_f(hidden))
 *
 * The same arithmetic as the module path (gpt_bigcode.py, with a packed CPU model's activations
 * in float32: cpu_linear.compute_in_float32), in one OpenMP region. Run step by step from Python,
 * the dispatch around these few-microsecond operations (embedding lookups, layer norms, a call
 * per block, building attention inputs) cost 2.5 ms of a 21 ms float16 token of tiny_starcoder.
 * The cache addresses come from the sequences' block tables, as the scheduler hands them out.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "vector_math.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* A Linear layer: packed weight (see linear.c) of wtype, float32 scales (int8 only) and bias (may be NULL). */
typedef struct {
    const void *weight;
    int wtype;
    const float *scales, *bias;
    long amx_min_rows; /* steps of at least this many rows multiply on AMX tiles (amx.c); 0: never */
} Linear;

/* One block's weights (float32 layer norms). */
typedef struct {
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
    Linear c_attn, attn_proj, c_fc, mlp_proj;
} Layer;

/* The model, filled once by Python (cpu_decode.py) after the weights are packed. */
typedef struct {
    long layers, embed, inner, qkv, vocab; /* qkv = embed + 2 * kv_heads * head_dim; vocab = lm_head rows */
    int heads, kv_heads, head_dim, gelu_tanh; /* gelu_tanh 1: tanh approximation, 0: exact erf */
    float eps, scale;
    const void *token_table; /* (token_rows, embed) of token_type, or the tied lm_head's panels */
    int token_type, token_table_packed;
    long token_rows;
    const void *position_table; /* (position_rows, embed) of position_type */
    int position_type;
    long position_rows;
    const float *lnf_weight, *lnf_bias;
    Linear lm_head;
    const Layer *layer; /* `layers` entries */
} Model;

/* One step: which tokens, where they sit, where their cache rows are. */
typedef struct {
    long rows;
    const int64_t *token_ids, *positions; /* (rows,) the new token of each sequence and its position */
    const int64_t *block_table;           /* (rows, max_blocks) cache blocks of each sequence, in order */
    long max_blocks, block_size;
    void *cache; /* (layers, 2, num_slots, kv_dim) keys then values of each layer */
    int cache_type;
    long num_slots;
} Step;

/* Buffers of a step, shared by the threads. */
typedef struct {
    float *hidden, *normed, *qkv, *attended, *wide, *mask, *partials; /* partials: long rows' attention parts */
    int64_t *write_slots, *read_slots;
    int64_t *lengths; /* each row's context (position + 1): where its attention ends */
    long max_len;
} Buffers;

/* x += residual (when given), then out = layer_norm(x), row by row: the residual add of one
 * sublayer and the norm of the next share a loop (and a barrier). */
static void add_and_norm_rows(float *x, const float *residual, long rows, long width, const float *weight,
                              const float *bias, float eps, float *out) {
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        float *xr = x + r * width;
        float *yr = out + r * width;
        if (residual)
            for (long i = 0; i < width; i++) xr[i] += residual[r * width + i];
        /* Sums in double, as the scalar loops below; 8 values at a time in two vectors of 4
         * (a scalar double chain cost 4 ms of a 128-sequence tiny_starcoder step). */
        double sum = 0.0, squares = 0.0;
        long i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
        for (; i + 8 <= width; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
        }
        double lanes[4];
        _mm256_storeu_pd(lanes, _mm256_add_pd(low, high));
        sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
        for (; i < width; i++) sum += xr[i];
        const float mean = (float)(sum / width);
        i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
        for (; i + 8 <= width; i += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + i), _mm256_set1_ps(mean));
            const __m256d d_low = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), d_high = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
            low = _mm256_fmadd_pd(d_low, d_low, low);
            high = _mm256_fmadd_pd(d_high, d_high, high);
        }
        _mm256_storeu_pd(lanes, _mm256_add_pd(low, high));
        squares = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
        for (; i < width; i++) squares += (double)(xr[i] - mean) * (xr[i] - mean);
        const float inverse = 1.0f / sqrtf((float)(squares / width) + eps);
        i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= width; i += 8) {
            const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), _mm256_set1_ps(mean)), _mm256_set1_ps(inverse));
            _mm256_storeu_ps(yr + i, _mm256_fmadd_ps(scaled, _mm256_loadu_ps(weight + i), _mm256_loadu_ps(bias + i)));
        }
#endif
        for (; i < width; i++) yr[i] = (xr[i] - mean) * inverse * weight[i] + bias[i];
    }
}

/* One float32 row into row `slot` of a cache of `width` values per row, as its type: eight values
 * a vector (store_eight_as: store_as's bits), the rest one by one. */
static void store_cache_row(void *cache, int type, long slot, long width, const float *row) {
    long i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= width; i += 8) store_eight_as(cache, type, slot * width + i, _mm256_loadu_ps(row + i));
#endif
    for (; i < width; i++) store_as(cache, type, slot * width + i, row[i]);
}

/* The new tokens' keys and values into a layer's cache (the module path's write on a CPU):
 * float32 rows `row_stride` apart (views of the fused projection's output), row r to row slots[r]
 * of keys_cache and values_cache (`type`, `width` values per row, num_slots rows; -2 and nothing
 * written for a slot outside them). PyTorch's conversions and two index_copy_ calls took 55 us
 * for 512 rows of 64 where this takes 13 (2-core Xeon). */
int starchat_write_cache(const float *keys, const float *values, long row_stride, long rows, long width,
                         const int64_t *slots, void *keys_cache, void *values_cache, long num_slots, int type, int threads) {
    if (type != W_F32 && type != W_F16 && type != W_BF16) return -1;
    for (long r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return -2; /* nothing written */
    if (rows <= 0) return 0;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (long r = 0; r < rows; r++) {
        store_cache_row(keys_cache, type, slots[r], width, keys + r * row_stride);
        store_cache_row(values_cache, type, slots[r], width, values + r * row_stride);
    }
    return 0;
}

static inline float gelu(float x, int tanh_approximation) {
    if (tanh_approximation) return gelu_tanh(x);
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

/* x = gelu(x) over `count` floats, shared among the threads (orphaned work-sharing loop). */
static void gelu_rows(float *x, long count, int tanh_approximation) {
    const long chunk = 512, chunks = (count + chunk - 1) / chunk;
#pragma omp for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * chunk, end = i + chunk < count ? i + chunk : count;
#if defined(__AVX512F__) && defined(__FMA__)
        if (tanh_approximation)
            for (; i + 16 <= end; i += 16) _mm512_storeu_ps(x + i, gelu_tanh16(_mm512_loadu_ps(x + i)));
#endif
#if defined(__AVX2__) && defined(__FMA__)
        if (tanh_approximation) /* scalar tanhf costs about as much as a layer's attention */
            for (; i + 8 <= end; i += 8) _mm256_storeu_ps(x + i, gelu_tanh8(_mm256_loadu_ps(x + i)));
#endif
        for (; i < end; i++) x[i] = gelu(x[i], tanh_approximation);
    }
}

/* x += residual (NULL: nothing added), then out = layer_norm(x), for `rows` rows of `width`
 * float32 values on `threads` threads: the module path's residual adds and layer norms on a CPU
 * (prompt chunks), the decode step's arithmetic in one pass. In a loop about as fast as PyTorch's
 * add and LayerNorm (2-core Xeon: 24 us for 128 x 768 values either way); in the engine, with one
 * call per norm instead of two operations, a 128-token prompt's first token x1.026. */
int starchat_add_layer_norm(float *x, const float *residual, long rows, long width, const float *weight, const float *bias,
                            float eps, float *out, int threads) {
    if (rows <= 0) return 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    add_and_norm_rows(x, residual, rows, width, weight, bias, eps, out);
    return 0;
}

/* x = gelu(x) in place for `count` float32 values on `threads` threads: the module path's GELU on
 * a CPU (prompt chunks), the same arithmetic as the decode step's. */
int starchat_gelu(float *x, long count, int tanh_approximation, int threads) {
    if (count <= 0) return 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    gelu_rows(x, count, tanh_approximation);
    return 0;
}

static void product(const float *x, long rows, const Linear *layer, float *y, long n, long k, int activation) {
    Output out = {y, W_F32, n, layer->scales, layer->bias, layer->amx_min_rows, activation};
    starchat_linear_columns(x, rows, layer->weight, layer->wtype, &out, n, k);
}

/* Row r of the token embedding table, as float32. A packed table holds row t at column t % PANEL
 * of panel t / PANEL (linear.c's layout). */
static void token_row(const Model *m, long token, float *out) {
    if (m->token_table_packed) {
        const long base = (token / PANEL) * m->embed * PANEL + token % PANEL;
        for (long j = 0; j < m->embed; j++) out[j] = weight_at(m->token_table, m->token_type, base + j * PANEL);
    } else {
        widen_to_float32((const char *)m->token_table + token * m->embed * element_size(m->token_type), m->token_type,
                         m->embed, out);
    }
}

/* Each sequence's cache rows (the token at position l of row r sits in slot
 * block_table[r][l / block_size] * block_size + l % block_size), its attention mask, and its first
 * hidden state. Rows of max_len entries, filled up to the sequence's own length: attention reads
 * no further (buf->lengths), so a long context in the batch costs the short rows nothing here. */
static void step_inputs(const Model *m, const Step *s, const Buffers *buf) {
#pragma omp for schedule(static)
    for (long r = 0; r < s->rows; r++) {
        const int64_t *blocks = s->block_table + r * s->max_blocks;
        const long position = s->positions[r];
        for (long l = 0; l <= position; l++) {
            buf->read_slots[r * buf->max_len + l] = blocks[l / s->block_size] * s->block_size + l % s->block_size;
            buf->mask[r * buf->max_len + l] = 0.0f;
        }
        buf->write_slots[r] = buf->read_slots[r * buf->max_len + position];
        float *hidden = buf->hidden + r * m->embed, *scratch = buf->normed + r * m->embed;
        token_row(m, s->token_ids[r], hidden);
        widen_to_float32((const char *)m->position_table + position * m->embed * element_size(m->position_type),
                         m->position_type, m->embed, scratch);
        for (long i = 0; i < m->embed; i++) hidden[i] += scratch[i];
    }
}

/* One block, inside the step's parallel region. `pending`: the previous block's MLP output, not
 * yet added to the residual stream (NULL for the first block); returns this block's. */
static const float *block(const Model *m, const Layer *layer, const Step *s, const Buffers *buf, const float *pending,
                          void *keys, void *values, float *attention_scratch) {
    const long rows = s->rows, embed = m->embed, kv_dim = (long)m->kv_heads * m->head_dim;
    add_and_norm_rows(buf->hidden, pending, rows, embed, layer->ln1_weight, layer->ln1_bias, m->eps, buf->normed);
    product(buf->normed, rows, &layer->c_attn, buf->qkv, m->qkv, embed, ACTIVATION_NONE);
    /* The new tokens' keys and values go to the cache before attention reads it; the queries (the
     * first `embed` columns of each qkv row) are compacted for it. */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *row = buf->qkv + r * m->qkv;
        store_cache_row(keys, s->cache_type, buf->write_slots[r], kv_dim, row + embed);
        store_cache_row(values, s->cache_type, buf->write_slots[r], kv_dim, row + embed + kv_dim);
        for (long i = 0; i < embed; i++) buf->normed[r * embed + i] = row[i];
    }
    starchat_attention_items(buf->normed, W_F32, keys, values, s->cache_type, buf->read_slots, buf->mask, buf->lengths, rows,
                             buf->max_len, m->heads, m->kv_heads, m->head_dim, m->scale, buf->attended, buf->partials,
                             attention_scratch);
    product(buf->attended, rows, &layer->attn_proj, buf->wide, embed, embed, ACTIVATION_NONE);
    add_and_norm_rows(buf->hidden, buf->wide, rows, embed, layer->ln2_weight, layer->ln2_bias, m->eps, buf->normed);
    /* the tanh GELU in the product's stores, while each panel's sums are in L1 */
    product(buf->normed, rows, &layer->c_fc, buf->wide, m->inner, embed, m->gelu_tanh ? ACTIVATION_GELU_TANH : ACTIVATION_NONE);
    if (!m->gelu_tanh) gelu_rows(buf->wide, rows * m->inner, 0);
    product(buf->wide, rows, &layer->mlp_proj, buf->attended, embed, m->inner, ACTIVATION_NONE);
    return buf->attended;
}

/* The index of the largest value of row[0 .. width) (the first of equal maxima; the first NaN if
 * any, as NumPy's argmax). Vectorised, each lane keeps the first index of its own maximum and the
 * lanes' smallest index among the overall maximum wins: the scalar loop's answer (-0.0 and 0.0
 * compare equal in both); a NaN anywhere sends the row to the scalar loop. */
static long argmax_row(const float *row, long width) {
    long start = 0, best = 0;
    float value = row[0];
#if defined(__AVX512F__)
    if (width >= 32) {
        __m512 maxima = _mm512_loadu_ps(row);
        __m512i where = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), at = where;
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 unordered = _mm512_cmp_ps_mask(maxima, maxima, _CMP_UNORD_Q);
        long i = 16;
        for (; i + 16 <= width && !unordered && i < (1L << 30); i += 16) {
            const __m512 v = _mm512_loadu_ps(row + i);
            at = _mm512_add_epi32(at, step);
            unordered = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 greater = _mm512_cmp_ps_mask(v, maxima, _CMP_GT_OQ);
            maxima = _mm512_mask_mov_ps(maxima, greater, v);
            where = _mm512_mask_mov_epi32(where, greater, at);
        }
        if (!unordered) {
            value = _mm512_reduce_max_ps(maxima);
            const __mmask16 top = _mm512_cmp_ps_mask(maxima, _mm512_set1_ps(value), _CMP_EQ_OQ);
            best = _mm512_mask_reduce_min_epi32(top, where);
            start = i;
        }
    }
#endif
    if (start == 0) { /* no vector pass (or a NaN in it): the whole row, scalar */
        best = 0;
        value = row[0];
        start = 1;
    }
    if (isnan(value)) return best;
    for (long i = start; i < width; i++) {
        if (isnan(row[i])) return i;
        if (row[i] > value) value = row[i], best = i;
    }
    return best;
}

static void argmax_rows(const float *logits, long rows, long width, int64_t *out) {
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) out[r] = argmax_row(logits + r * width, width);
}

/* logits: (rows, vocab) float32; greedy (may be NULL): (rows,) each row's argmax. Returns 0; -1
 * for a token id, position or cache block out of range (nothing is written then); -2 when out of
 * memory. */
int starchat_decode_step(const Model *m, const Step *s, float *logits, int64_t *greedy, int threads) {
    const long rows = s->rows, kv_dim = (long)m->kv_heads * m->head_dim;
    if (rows <= 0) return 0;
    if (s->block_size <= 0 || s->max_blocks <= 0) return -1;
    long max_len = 0;
    for (long r = 0; r < rows; r++) {
        const long token = s->token_ids[r], position = s->positions[r];
        if (token < 0 || token >= m->token_rows || position < 0 || position >= m->position_rows ||
            position / s->block_size >= s->max_blocks)
            return -1;
        for (long b = 0; b <= position / s->block_size; b++) {
            const int64_t id = s->block_table[r * s->max_blocks + b];
            if (id < 0 || (id + 1) * s->block_size > s->num_slots) return -1;
        }
        max_len = position + 1 > max_len ? position + 1 : max_len;
    }
    long partial_floats = 0;
    for (long r = 0; r < rows; r++) {
        const int64_t length = s->positions[r] + 1;
        partial_floats += starchat_attention_partials(&length, 1, max_len, m->heads, m->head_dim);
    }
    const long wide = m->inner > m->embed ? m->inner : m->embed;
    const long floats = rows * (3 * m->embed + m->qkv + wide + max_len) + partial_floats;
    const long slots = rows * (2 + max_len);
    /* One allocation: the slot tables first (8-byte aligned), then the float buffers. */
    int64_t *shared = (int64_t *)malloc((size_t)slots * sizeof(int64_t) + (size_t)floats * sizeof(float));
    if (!shared) return -2;
    Buffers buf;
    buf.max_len = max_len;
    buf.write_slots = shared;
    buf.lengths = buf.write_slots + rows;
    buf.read_slots = buf.lengths + rows;
    buf.hidden = (float *)(buf.read_slots + rows * max_len);
    for (long r = 0; r < rows; r++) buf.lengths[r] = s->positions[r] + 1;
    buf.normed = buf.hidden + rows * m->embed;
    buf.attended = buf.normed + rows * m->embed;
    buf.qkv = buf.attended + rows * m->embed;
    buf.wide = buf.qkv + rows * m->qkv;
    buf.mask = buf.wide + rows * wide;
    buf.partials = buf.mask + rows * max_len;
    threads = threads > 0 ? threads : 1;
    const long attention_floats = starchat_attention_scratch(max_len, m->heads, m->kv_heads, m->head_dim);
    const long layer_elements = 2 * s->num_slots * kv_dim;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *attention_scratch = starchat_thread_scratch(attention_floats, &failed);
        if (!failed) {
            step_inputs(m, s, &buf);
            const float *pending = NULL;
            for (long i = 0; i < m->layers; i++) {
                char *keys = (char *)s->cache + i * layer_elements * element_size(s->cache_type);
                char *values = keys + s->num_slots * kv_dim * element_size(s->cache_type);
                pending = block(m, &m->layer[i], s, &buf, pending, keys, values, attention_scratch);
            }
            add_and_norm_rows(buf.hidden, pending, rows, m->embed, m->lnf_weight, m->lnf_bias, m->eps, buf.normed);
            product(buf.normed, rows, &m->lm_head, logits, m->vocab, m->embed, ACTIVATION_NONE);
            if (greedy) argmax_rows(logits, rows, m->vocab, greedy);
        }
        free(attention_scratch);
    }
    free(shared);
    return failed ? -2 : 0;
}
