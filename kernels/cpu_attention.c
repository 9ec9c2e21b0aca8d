/* Paged attention on the CPU, read and written in place in the KV cache.
 *
 * A decode step's attention is a few thousand dot products per layer; in torch it costs a gather
 * of every sequence's keys and values into a padded tensor, a mask, and a flash-attention call,
 * each sized for far more work (7 ms of a 43 ms batch-16 SmolLM2 step on the 2-core VM), and a
 * prefill pays one such call per sequence and layer. Here each (sequence, key/value head) pair
 * walks its block table for each of its query tokens: the scores of the query heads that share
 * the key/value head, an exact two-pass softmax, and the weighted sum of values.
 *
 * Built by kernels/native_build.py and called through ctypes (kernels/cpu_attention.py).
 */
#include <math.h>
#include <omp.h>

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

/* Where a token's key sits; its value is value_offset floats after it. */
static inline const float *key_at(const float *cache, const int32_t *table, int t, int block_size, long block_stride,
                                  long token_stride) {
    return cache + table[t / block_size] * block_stride + (t % block_size) * token_stride;
}

/* Attention of one query token for `heads` consecutive query heads (q, o: [heads][head_dim];
 * cache offset to the first one's key/value head) over context tokens 0..visible-1. Query head i
 * reads key/value head i / group. A token's keys for all these heads are one contiguous row, read
 * once: a block's keys (or values) then stream as one piece, which the prefetchers follow. */
static void attend_token(const float *q, float *o, int heads, int group, int head_dim, const float *cache,
                         long block_stride, long value_offset, long token_stride, long head_stride,
                         const int32_t *table, int block_size, int visible, float scale, float *scores) {
    for (int t = 0; t < visible; t++) {
        const float *keys = key_at(cache, table, t, block_size, block_stride, token_stride);
        for (int i = 0; i < heads; i++)
            scores[(size_t)i * visible + t] = dot(q + i * head_dim, keys + (i / group) * head_stride, head_dim) * scale;
    }
    for (int i = 0; i < heads; i++) {
        float *row = scores + (size_t)i * visible, top = row[0];
        for (int t = 1; t < visible; t++) top = fmaxf(top, row[t]);
        float total = exponentiate(row, visible, top);
        for (int t = 0; t < visible; t++) row[t] /= total;
    }
    memset(o, 0, (size_t)heads * head_dim * sizeof(float));
    for (int t = 0; t < visible; t++) {
        const float *values = key_at(cache, table, t, block_size, block_stride, token_stride) + value_offset;
        for (int i = 0; i < heads; i++)
            add_scaled(o + i * head_dim, values + (i / group) * head_stride, scores[(size_t)i * visible + t], head_dim);
    }
}

/* out [T, H, D] = causal attention of query [T, H, D] (contiguous), any mix of prefill, chunked
 * prefill and decode: sequence s owns query rows query_start[s]..query_start[s+1]-1, the last of
 * its seq_lens[s] tokens, and query row j of q sees context tokens 0..seq_len - q + j. Token t of
 * sequence s is in block block_tables[s * table_stride + t / block_size], slot t % block_size;
 * strides are in floats and head_dim is contiguous. Query head h reads key/value head h / (H / KVH).
 * Threads take (sequence, key/value heads) pieces: all of a sequence's heads when there are
 * sequences enough to share, one key/value head each when there are few (a batch of one).
 * Returns 0, or -1 when a scores buffer cannot be allocated (out is then incomplete). */
int paged_attention(const float *query, const float *cache, long block_stride, long value_offset, long token_stride,
                    long head_stride, const int32_t *block_tables, int table_stride, const int32_t *query_start,
                    const int32_t *seq_lens, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                    int block_size, float scale, float *out) {
    int group = num_heads / num_kv_heads, failed = 0;
    int kv_heads_per_piece = num_seqs >= 4 * omp_get_max_threads() ? num_kv_heads : 1;
    int pieces_per_seq = num_kv_heads / kv_heads_per_piece, heads = kv_heads_per_piece * group;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int piece = 0; piece < num_seqs * pieces_per_seq; piece++) {
        int s = piece / pieces_per_seq, kv_head = piece % pieces_per_seq * kv_heads_per_piece, length = seq_lens[s];
        int first = query_start[s], count = query_start[s + 1] - first;
        float *scores = count ? thread_buffer((size_t)heads * length) : NULL; /* the scores of one query token */
        if (count && scores == NULL) {
            failed = 1;
            continue;
        }
        for (int j = 0; j < count; j++) {
            size_t row = ((size_t)(first + j) * num_heads + (size_t)kv_head * group) * head_dim;
            attend_token(query + row, out + row, heads, group, head_dim, cache + kv_head * head_stride, block_stride,
                         value_offset, token_stride, head_stride, block_tables + (size_t)s * table_stride, block_size,
                         length - count + 1 + j, scale, scores);
        }
    }
    return failed ? -1 : 0;
}

/* Each new token's key and value rows (row_floats = kv_heads * head_dim, contiguous; rows
 * key_stride / value_stride floats apart) into its cache slot: block slot / block_size, offset
 * slot % block_size. */
void store_kv(float *cache, long block_stride, long value_offset, long token_stride, const float *key, long key_stride,
              const float *value, long value_stride, const int64_t *slots, int tokens, int row_floats, int block_size) {
    for (int i = 0; i < tokens; i++) {
        float *dst = cache + (slots[i] / block_size) * block_stride + (slots[i] % block_size) * token_stride;
        memcpy(dst, key + (size_t)i * key_stride, (size_t)row_floats * sizeof(float));
        memcpy(dst + value_offset, value + (size_t)i * value_stride, (size_t)row_floats * sizeof(float));
    }
}
