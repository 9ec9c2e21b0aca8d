/* Vector helpers shared by the CPU kernels (cpu_*.c): GCC vector extensions, which compile to
 * AVX-512 instructions with -march=native. kernels/native_build.py rebuilds a kernel when this
 * header changes. */
#ifndef TANDEM_CPU_VECTOR_H
#define TANDEM_CPU_VECTOR_H

/* 16-float vectors are one register only with AVX-512; GCC splits them for AVX2 or NEON, and there
 * spilled the matmul's accumulators to memory (40x slower at 16 rows than the AVX-512 build,
 * measured with -march=haswell on the Intel VM). A CPU without AVX-512 therefore fails the build and runs the torch paths. */
#if !defined(__AVX512F__)
#error "Tandem's C kernels need AVX-512 (16-float vectors); this CPU runs the torch paths"
#endif

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }

/* A calling thread's buffer of at least `floats` floats, 64-byte aligned, kept between calls and
 * grown when too small; NULL if it cannot be. Allocated per call, a down projection's 196 KB came
 * from mmap and cost fresh page faults every time. Each kernel file has its own. */
static inline float *thread_buffer(size_t floats) {
    static __thread float *buffer;
    static __thread size_t capacity;
    if (floats > capacity) {
        free(buffer);
        size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        buffer = aligned_alloc(64, bytes);
        capacity = buffer ? floats : 0;
    }
    return buffer;
}

/* Lane by lane: a where mask is set (all ones), else b. */
static inline v16f select16(v16i mask, v16f a, v16f b) {
    v16i a_bits, b_bits;
    memcpy(&a_bits, &a, sizeof a_bits);
    memcpy(&b_bits, &b, sizeof b_bits);
    v16i chosen = (a_bits & mask) | (b_bits & ~mask);
    v16f out;
    memcpy(&out, &chosen, sizeof out);
    return out;
}

static inline float horizontal_sum(v16f v) {
    typedef float v8f __attribute__((vector_size(32)));
    typedef float v4f __attribute__((vector_size(16)));
    v8f h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
    return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

/* e^x for x <= 0, 16 at a time: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to
 * r^7 (relative error under 1e-8 there), times 2^n built in the exponent bits. Within 2 ulp of
 * expf, which, one scalar call per value, cost more than the rest of a softmax or a SiLU. */
static inline v16f exp_nonpositive(v16f x) {
    v16f zero = {0};
    v16i in_range = x > -87.0f; /* below, e^x is under float's smallest normal: 0 */
    v16f n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, v16i), v16f); /* round(x / ln2) */
    v16f r = (x - n * 0.693145752f) - n * 1.42860677e-6f; /* ln2 in two parts: n * the first is exact */
    v16f p = zero + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v16i exponent = ((__builtin_convertvector(n, v16i) + 127) << 23) & in_range; /* 2^n, or +0.0 */
    v16f scale;
    memcpy(&scale, &exponent, sizeof scale);
    return p * scale;
}

#endif
