/* The small per-layer ops of a CPU decode step, one call each instead of four to seven torch ops.
 *
 * At decode sizes ([16, 576] activations) a torch op costs its dispatch, not its bytes: residual
 * add + RMSNorm was 7 ops, SiLU-mul 3, rotary 4, together about 6 ms of a 35 ms batch-16 SmolLM2
 * step on the 2-core VM. The formulas are the torch path's (models/layers/fused.py), built without
 * fused multiply-adds so that each rounds where torch does: results differ from it only by the
 * order of the mean's sum and the vector exp of cpu_vector.h. Single-threaded: at these sizes a
 * thread hand-off costs more than it saves.
 *
 * Built by kernels/native_build.py and called through ctypes (kernels/cpu_fused.py).
 */
#include <math.h>

#include "cpu_vector.h"

/* sum = x + residual (or x, when residual is NULL, and sum is not written);
 * normed = weight * (sum * rsqrt(mean(sum^2) + eps)), row by row of dim floats. */
void add_rms_norm(const float *x, const float *residual, const float *weight, int rows, int dim, float eps,
                  float *normed, float *sum) {
    for (int r = 0; r < rows; r++) {
        const float *a = x + (size_t)r * dim, *b = residual ? residual + (size_t)r * dim : NULL;
        float *s = residual ? sum + (size_t)r * dim : NULL, *out = normed + (size_t)r * dim;
        const float *values = residual ? s : a;
        v16f squares16 = {0};
        int d = 0;
        for (; d + 16 <= dim; d += 16) {
            v16f v = load16(a + d);
            if (b) {
                v += load16(b + d);
                store16(s + d, v);
            }
            squares16 += v * v;
        }
        float squares = horizontal_sum(squares16);
        for (; d < dim; d++) {
            float v = b ? (s[d] = a[d] + b[d]) : a[d];
            squares += v * v;
        }
        float inverse_rms = 1.0f / sqrtf(squares / (float)dim + eps);
        for (d = 0; d + 16 <= dim; d += 16) store16(out + d, load16(weight + d) * (load16(values + d) * inverse_rms));
        for (; d < dim; d++) out[d] = weight[d] * (values[d] * inverse_rms);
    }
}

/* silu(g) = g / (1 + e^-g), torch's form, for g >= 0; below, where e^-g could overflow,
 * g e^g / (1 + e^g): both from e = e^-|g|, which cannot. */
static inline v16f silu16(v16f g) {
    v16i negative = g < 0.0f;
    v16f e = exp_nonpositive(select16(negative, g, -g));
    return select16(negative, g * e, g) / (1.0f + e);
}

/* out [rows, inner] = silu(gate) * up, gate_up [rows, 2 * inner] (gate, then up). */
void silu_mul(const float *gate_up, int rows, int inner, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *gate = gate_up + (size_t)r * 2 * inner, *up = gate + inner;
        float *o = out + (size_t)r * inner;
        int d = 0;
        for (; d + 16 <= inner; d += 16) store16(o + d, silu16(load16(gate + d)) * load16(up + d));
        for (; d < inner; d++) o[d] = gate[d] / (1.0f + expf(-gate[d])) * up[d];
    }
}

/* In place, for each token t and head h of x (row t starts row_stride floats after row t - 1;
 * heads are contiguous, head_dim floats each): x = x * cos[t] + rotate_half(x) * sin[t], where
 * rotate_half(x) = (-x[half:], x[:half]) (Hugging Face's convention); cos, sin [T, head_dim]. */
void rotary(float *x, int tokens, long row_stride, int heads, int head_dim, const float *cos, const float *sin) {
    int half = head_dim / 2;
    float rotated[head_dim];
    for (int t = 0; t < tokens; t++) {
        const float *c = cos + (size_t)t * head_dim, *s = sin + (size_t)t * head_dim;
        for (int h = 0; h < heads; h++) {
            float *v = x + (size_t)t * row_stride + (size_t)h * head_dim;
            for (int d = 0; d < half; d++) rotated[d] = -v[d + half], rotated[d + half] = v[d];
            int d = 0;
            for (; d + 16 <= head_dim; d += 16)
                store16(v + d, load16(v + d) * load16(c + d) + load16(rotated + d) * load16(s + d));
            for (; d < head_dim; d++) v[d] = v[d] * c[d] + rotated[d] * s[d];
        }
    }
}
