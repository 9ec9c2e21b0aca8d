/* Decode attention on the CPU, read straight from the paged KV cache.
 *
 * A decode step's attention is a few thousand dot products per layer; in torch it costs a gather
 * of every sequence's keys and values into a padded tensor, a mask, and a flash-attention call,
 * each sized for far more work (7 ms of a 43 ms batch-16 SmolLM2 step on the 2-core VM). Here each
 * (sequence, key/value head) pair walks its block table once: the scores of the query heads that
 * share the key/value head, an exact two-pass softmax, and the weighted sum of values.
 *
 * Built by kernels/native_build.py and called through ctypes (kernels/cpu_attention.py).
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_vector.h"

/* row[t] = e^(row[t] - top); returns their sum. */
static float exponentiate(float *row, int n, float top) {
    v16f total16 = {0};
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        v16f e = exp_nonpositive(load16(row + t) - top);
        store16(row + t, e);
        total16 += e;
    }
    float total = horizontal_sum(total16);
    for (; t < n; t++) total += row[t] = expf(row[t] - top);
    return total;
}

static float dot(const float *a, const float *b, int n) {
    v16f acc = {0};
    int d = 0;
    for (; d + 16 <= n; d += 16) acc += load16(a + d) * load16(b + d);
    float sum = horizontal_sum(acc);
    for (; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* out += weight * v over n floats. */
static void add_scaled(float *out, const float *v, float weight, int n) {
    int d = 0;
    for (; d + 16 <= n; d += 16) store16(out + d, load16(out + d) + weight * load16(v + d));
    for (; d < n; d++) out[d] += weight * v[d];
}

/* A thread's buffer for the scores of one (sequence, key/value head), kept between calls. */
static float *thread_scores(size_t count) {
    static __thread float *buffer;
    static __thread size_t capacity;
    if (count > capacity) {
        free(buffer);
        buffer = malloc(count * sizeof(float));
        capacity = buffer ? count : 0;
    }
    return buffer;
}

/* out [S, H, D] = attention of query [S, H, D] (one token a sequence, contiguous) over tokens
 * 0..seq_lens[s]-1 of sequence s. Token t of sequence s is block block_tables[s * table_stride +
 * t / block_size], slot t % block_size; strides are in floats, head_dim is contiguous; the value
 * of a key is value_offset floats after it. Query head h reads key/value head h / (H / KVH).
 * Returns 0, or -1 when a scores buffer cannot be allocated (out is then incomplete). */
int paged_decode_attention(const float *query, const float *cache, long block_stride, long value_offset,
                           long token_stride, long head_stride, const int32_t *block_tables, int table_stride,
                           const int32_t *seq_lens, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                           int block_size, float scale, float *out) {
    int group = num_heads / num_kv_heads, failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int unit = 0; unit < num_seqs * num_kv_heads; unit++) {
        int s = unit / num_kv_heads, kv_head = unit % num_kv_heads, length = seq_lens[s];
        const int32_t *table = block_tables + (size_t)s * table_stride;
        const float *q = query + ((size_t)s * num_heads + (size_t)kv_head * group) * head_dim;
        float *o = out + ((size_t)s * num_heads + (size_t)kv_head * group) * head_dim;
        float *scores = thread_scores((size_t)group * length);
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        for (int t = 0; t < length; t++) {
            const float *key = cache + table[t / block_size] * block_stride + (t % block_size) * token_stride +
                               kv_head * head_stride;
            for (int g = 0; g < group; g++) scores[(size_t)g * length + t] = dot(q + g * head_dim, key, head_dim) * scale;
        }
        for (int g = 0; g < group; g++) {
            float *row = scores + (size_t)g * length, top = row[0], total = 0.0f;
            for (int t = 1; t < length; t++) top = fmaxf(top, row[t]);
            total = exponentiate(row, length, top);
            for (int t = 0; t < length; t++) row[t] /= total;
        }
        memset(o, 0, (size_t)group * head_dim * sizeof(float));
        for (int t = 0; t < length; t++) {
            const float *value = cache + table[t / block_size] * block_stride + (t % block_size) * token_stride +
                                 kv_head * head_stride + value_offset;
            for (int g = 0; g < group; g++) add_scaled(o + g * head_dim, value, scores[(size_t)g * length + t], head_dim);
        }
    }
    return failed ? -1 : 0;
}
