/* Matmuls against weights stored on their quantization grid, for CPU decode.
 *
 * A weight loaded from a Q4_1 or Q8_0 GGUF file is, after dequantization to float32, exactly
 * code * scale + offset for every group of 32 inputs of an output row, with a 4- or 8-bit code.
 * Storing the codes and the two floats per group instead of the float32 values is lossless and
 * reads 6 or 10 bits a weight instead of 32: a decode step on a CPU streams every weight once per
 * step, so that traffic, and the float32 kernel's poor use of the FMA units at a few rows, is where
 * a step's time goes. grid_pack finds the grid and refuses (returns the first weight it cannot
 * reproduce) when there is none; grid_linear rebuilds each weight with one fused multiply-add, bit
 * for bit the value the checkpoint loader made, and multiplies in float32.
 *
 * Layout: the output rows are cut into panels of 32; a panel is K / 32 groups, each group
 *   float scale[32], float offset[32]   (one per output row of the panel)
 *   codes for 32 inputs x 32 rows:      8-bit: byte [k][j] is row j's code
 *                                       4-bit: byte [k][j] holds row j (low nibble), row j + 16 (high)
 * so that one input's codes of a whole panel load as one vector.
 *
 * Built at run time by kernels/native_build.py (-O3 -march=native -fopenmp) and called through
 * ctypes; OpenMP resolves to the runtime torch already loaded, so both share one thread pool.
 */
#include <immintrin.h>
#include <math.h>

#include "cpu_vector.h"

#define PANEL 32 /* output rows per panel */
#define GROUP 32 /* inputs per scale and offset */
#define MAX_ROWS 8 /* input rows per micro-kernel call: 16 accumulators, 2 weight vectors */

typedef uint8_t v16u8 __attribute__((vector_size(16)));
static inline v16f u8_to_float(v16u8 c) { return __builtin_convertvector(__builtin_convertvector(c, v16i), v16f); }

/* 16 codes straight from memory. GCC 12 builds the generic form byte by byte when the codes are
 * not computed first (5x slower 8-bit weights), so this names the instruction. */
static inline v16f load_u8_as_float(const uint8_t *p) {
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static size_t group_bytes(int bits) { return 2 * PANEL * sizeof(float) + GROUP * PANEL * bits / 8; }

size_t grid_packed_bytes(int rows, int cols, int bits) {
    return (size_t)(rows / PANEL) * (cols / GROUP) * group_bytes(bits);
}

/* ---- packing: find each group's grid, or report the first weight that is not on one ---- */

/* Scales are kept to float16 precision: then code * scale is exact in float32 (8 + 11 bits), so a
 * multiply then add and a fused multiply-add give the same weight, whatever the compiler emits. */
static float to_half_precision(float x) { return (float)(_Float16)x; }

/* The grid of one group of 32 weights (stride 1), or 0 if they are not all on it.
 * 4-bit (Q4_1's construction): offset = the minimum, scale = (max - min) / 15, codes 0..15.
 * 8-bit (Q8_0's): scale = max|w| / 127, codes 1..255 around 128, offset = -128 * scale (exact). */
static int fit_group(const float *w, int bits, float *scale, float *offset, uint8_t *codes) {
    float lo = w[0], hi = w[0], amax = fabsf(w[0]);
    for (int i = 1; i < GROUP; i++) {
        lo = fminf(lo, w[i]);
        hi = fmaxf(hi, w[i]);
        amax = fmaxf(amax, fabsf(w[i]));
    }
    float s, o, base;
    int top;
    if (bits == 4) {
        s = to_half_precision((hi - lo) / 15.0f), o = lo, base = 0.0f, top = 15;
    } else {
        s = to_half_precision(amax / 127.0f), o = -128.0f * s, base = 128.0f, top = 255;
    }
    for (int i = 0; i < GROUP; i++) {
        float code = s != 0.0f ? (bits == 4 ? nearbyintf((w[i] - o) / s) : base + nearbyintf(w[i] / s)) : base;
        if (!(code >= 0.0f && code <= (float)top) || fmaf(code, s, o) != w[i])
            return 0; /* also false for NaN and infinities */
        codes[i] = (uint8_t)code;
    }
    *scale = s;
    *offset = o;
    return 1;
}

/* One panel's groups; returns -1, or the flat index of the first weight of a group off its grid. */
static long pack_panel(const float *weight, int p, int cols, int bits, uint8_t *out) {
    int groups = cols / GROUP;
    size_t gbytes = group_bytes(bits);
    for (int g = 0; g < groups; g++) {
        uint8_t *dst = out + ((size_t)p * groups + g) * gbytes;
        float *scale = (float *)dst, *offset = scale + PANEL;
        uint8_t *packed_codes = dst + 2 * PANEL * sizeof(float);
        for (int j = 0; j < PANEL; j++) {
            size_t first = (size_t)(p * PANEL + j) * cols + (size_t)g * GROUP;
            uint8_t codes[GROUP];
            if (!fit_group(weight + first, bits, &scale[j], &offset[j], codes))
                return (long)first;
            for (int k = 0; k < GROUP; k++) {
                if (bits == 8)
                    packed_codes[k * PANEL + j] = codes[k];
                else if (j < PANEL / 2)
                    packed_codes[k * PANEL / 2 + j] = codes[k];
                else
                    packed_codes[k * PANEL / 2 + j - PANEL / 2] |= (uint8_t)(codes[k] << 4);
            }
        }
    }
    return -1;
}

/* weight [rows, cols] float32 (rows and cols multiples of 32) -> out (grid_packed_bytes), the
 * panels shared among threads (0.66 s for SmolLM2's weights on one). Returns -1 if every weight
 * is reproduced exactly, else the flat index of a group that is not; threads stop at the first
 * one any of them finds, so a weight off the grid costs a few groups, not a pass. */
long grid_pack(const float *weight, int rows, int cols, int bits, uint8_t *out) {
    long off_grid = -1;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < rows / PANEL; p++) {
        if (__atomic_load_n(&off_grid, __ATOMIC_RELAXED) != -1)
            continue;
        long found = pack_panel(weight, p, cols, bits, out);
        if (found != -1)
            __atomic_store_n(&off_grid, found, __ATOMIC_RELAXED);
    }
    return off_grid;
}

/* ---- the matmul ---- */

static inline v16u8 load_codes(const uint8_t *p) { v16u8 v; memcpy(&v, p, sizeof v); return v; }

/* One group's 32 inputs x 32 rows as float32 [32][32], rebuilt from its codes. (One loop per code
 * width: with a branch inside one loop GCC built the 8-bit codes' vectors byte by byte.) */
static void unpack_group_4bit(const uint8_t *group, float *out) {
    const float *scale = (const float *)group;
    v16f s0 = load16(scale), s1 = load16(scale + 16), o0 = load16(scale + PANEL), o1 = load16(scale + PANEL + 16);
    const uint8_t *codes = group + 2 * PANEL * sizeof(float);
    for (int k = 0; k < GROUP; k++, out += PANEL) {
        v16u8 c = load_codes(codes + k * PANEL / 2);
        store16(out, u8_to_float(c & 15) * s0 + o0);
        store16(out + 16, u8_to_float(c >> 4) * s1 + o1);
    }
}

static void unpack_group_8bit(const uint8_t *group, float *out) {
    const float *scale = (const float *)group;
    v16f s0 = load16(scale), s1 = load16(scale + 16), o0 = load16(scale + PANEL), o1 = load16(scale + PANEL + 16);
    const uint8_t *codes = group + 2 * PANEL * sizeof(float);
    for (int k = 0; k < GROUP; k++, out += PANEL) {
        store16(out, load_u8_as_float(codes + k * PANEL) * s0 + o0);
        store16(out + 16, load_u8_as_float(codes + k * PANEL + 16) * s1 + o1);
    }
}

/* One panel's weights as float32 [cols][32]. */
static void unpack_panel(const uint8_t *panel, int groups, int bits, float *dst) {
    size_t gbytes = group_bytes(bits);
    for (int g = 0; g < groups; g++) {
        float *out = dst + (size_t)g * GROUP * PANEL;
        if (bits == 8)
            unpack_group_8bit(panel + (size_t)g * gbytes, out);
        else
            unpack_group_4bit(panel + (size_t)g * gbytes, out);
    }
}

/* out[r][0..32) = bias + sum_k x[r][k] * w[k][0..32) for ROWS rows: every output sums its products
 * in input order, the same whatever the batch around it. */
#define DEFINE_MICRO_KERNEL(ROWS)                                                                     \
    static void micro_kernel_##ROWS(int cols, const float *x, const float *w, const float *bias,        \
                                    float *out, int out_stride) {                                       \
        v16f zero = {0}, acc0[ROWS], acc1[ROWS];                                                        \
        v16f bias0 = bias ? load16(bias) : zero, bias1 = bias ? load16(bias + 16) : zero;               \
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) acc0[r] = bias0, acc1[r] = bias1;      \
        for (int k = 0; k < cols; k++) {                                                                \
            v16f w0 = load16(w + (size_t)k * PANEL), w1 = load16(w + (size_t)k * PANEL + 16);          \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                    \
                float a = x[(size_t)r * cols + k];                                                      \
                acc0[r] += a * w0;                                                                      \
                acc1[r] += a * w1;                                                                      \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                        \
            store16(out + (size_t)r * out_stride, acc0[r]);                                             \
            store16(out + (size_t)r * out_stride + 16, acc1[r]);                                        \
        }                                                                                               \
    }
DEFINE_MICRO_KERNEL(1)
DEFINE_MICRO_KERNEL(2)
DEFINE_MICRO_KERNEL(3)
DEFINE_MICRO_KERNEL(4)
DEFINE_MICRO_KERNEL(5)
DEFINE_MICRO_KERNEL(6)
DEFINE_MICRO_KERNEL(7)
DEFINE_MICRO_KERNEL(8)

typedef void (*micro_kernel)(int, const float *, const float *, const float *, float *, int);
static const micro_kernel MICRO_KERNELS[MAX_ROWS + 1] = {
    0, micro_kernel_1, micro_kernel_2, micro_kernel_3, micro_kernel_4,
    micro_kernel_5, micro_kernel_6, micro_kernel_7, micro_kernel_8,
};

/* out [rows, out_features] = x [rows, cols] @ W^T (+ bias), W packed by grid_pack. Threads split
 * the panels; each rebuilds its panel once into a buffer that stays in its L2 cache and runs
 * every 8 input rows against it. Returns 0, or -1 when that buffer cannot be allocated. */
int grid_linear(const float *x, int rows, int cols, const uint8_t *packed, int out_features, int bits,
                const float *bias, float *out) {
    int panels = out_features / PANEL, groups = cols / GROUP, failed = 0;
    size_t panel_bytes = (size_t)groups * group_bytes(bits);
#pragma omp parallel reduction(| : failed)
    {
        float *scratch = thread_buffer((size_t)cols * PANEL); /* one panel's float32 weights */
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            if (!scratch)
                continue;
            unpack_panel(packed + p * panel_bytes, groups, bits, scratch);
            for (int r = 0; r < rows; r += MAX_ROWS) {
                int n = rows - r < MAX_ROWS ? rows - r : MAX_ROWS;
                MICRO_KERNELS[n](cols, x + (size_t)r * cols, scratch, bias ? bias + p * PANEL : NULL,
                                 out + (size_t)r * out_features + p * PANEL, out_features);
            }
        }
    }
    return failed ? -1 : 0;
}

