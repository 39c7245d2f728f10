/* The CPU's LoRA delta for one projection and one adapter: y[i, :] += (x[i, :] A^T) B^T.
 *
 * Why a kernel of our own: at decode sizes (a few rows, rank 8 to 64) the work is small and runs right
 * after a large matmul has flushed the caches. Two torch matmuls per segment then cost more in dispatch
 * and setup on cold caches than in arithmetic; here one call covers all segments of a projection, and
 * the zero blocks of a fused projection's block-diagonal B are skipped.
 *
 * Every row is computed in one fixed order whatever the other rows of the step and the thread count:
 * the shrink sums the input dimension in order, the expand adds the rank terms in order to y. So a
 * sequence's result never depends on what it is batched with.
 *
 * Two element types, one entry point each: float32 (chatmed_lora_step) and bfloat16
 * (chatmed_lora_step_bf16), where x, y and the weights are all bfloat16. In bfloat16 the arithmetic is
 * float32: the low-rank product stays float32, and each y element is rounded once, after its whole delta
 * is added (to nearest even, as torch's scalar conversion rounds; a NaN becomes 0x7FC0).
 *
 * Weights come packed by engine/model/lora_cpu.py in column tiles of W elements, so every inner loop
 * reads memory in order:
 *   at: [rank_pad / W][in_dim][W]   A^T, rank padded with zero columns up to a multiple of W;
 *   bt: per block, [ceil(cols / W)][rows][W]   the block's rows of B^T, columns padded with zeros.
 * Built by the engine with the host's C compiler. Many rows (a prefill) are split between torch's
 * threads: with OpenMP the kernel runs on the runtime torch has loaded (the same libgomp, so the same
 * threads). A few rows stay on the calling thread: splitting so little work lost more to waiting at the
 * barrier, whenever another thread (the server's event loop) held a core, than it gained.
 */
#include <stdint.h>

#define W 16           /* elements per vector: one AVX-512 register of floats, two AVX2 ones, four NEON ones */
#define MR 8           /* rows computed together */
#define PARALLEL_ROWS 64 /* from this many rows of one adapter, row blocks are split between threads */

typedef float vec __attribute__((vector_size(4 * W)));
typedef float vec_u __attribute__((vector_size(4 * W), aligned(4))); /* the same, unaligned access */
typedef uint32_t bits __attribute__((vector_size(4 * W)));
typedef uint16_t half __attribute__((vector_size(2 * W)));
typedef uint16_t half_u __attribute__((vector_size(2 * W), aligned(2)));

typedef struct {
  int64_t in_dim, rank_pad, num_blocks;
  const void *at;
  const void *bt;
  /* [num_blocks, 5]: rank rows [r0, r1) add to output columns [c0, c1); the block's offset in bt */
  const int64_t *blocks;
} lora_weights;

#define INLINE static inline __attribute__((always_inline))

/* bfloat16 is the top half of a float32: widening is exact. Narrowing rounds to nearest even (a value
 * past the largest finite bfloat16 becomes inf) and makes any NaN the NaN 0x7FC0. */
INLINE vec widen(half h) { return (vec)(__builtin_convertvector(h, bits) << 16); }

INLINE half narrow(vec v) {
  bits b = (bits)v;
  bits rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16;
  bits nan = (bits)(v != v); /* all ones where v is NaN */
  return __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0), half);
}

INLINE float widen1(uint16_t h) {
  union { uint32_t u; float f; } c = {.u = (uint32_t)h << 16};
  return c.f;
}

INLINE uint16_t narrow1(float f) {
  union { float f; uint32_t u; } c = {.f = f};
  if (f != f) return 0x7FC0;
  return (uint16_t)((c.u + 0x7FFF + ((c.u >> 16) & 1)) >> 16);
}

/* Element i of p, W of them from i, as floats; `bf16` is a constant in every inlined copy. */
INLINE vec load(const void *p, int64_t i, int bf16) {
  return bf16 ? widen(*(const half_u *)((const uint16_t *)p + i)) : *(const vec_u *)((const float *)p + i);
}

INLINE void store(void *p, int64_t i, vec v, int bf16) {
  if (bf16)
    *(half_u *)((uint16_t *)p + i) = narrow(v);
  else
    *(vec_u *)((float *)p + i) = v;
}

INLINE float load1(const void *p, int64_t i, int bf16) {
  return bf16 ? widen1(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

INLINE void store1(void *p, int64_t i, float v, int bf16) {
  if (bf16)
    ((uint16_t *)p)[i] = narrow1(v);
  else
    ((float *)p)[i] = v;
}

/* low[i, :] (+)= x[i, :n] A^T[k0 : k0 + n] for m <= MR rows: x is float32 here, its columns k0 onwards
 * (row stride xs); the sums start at 0 for k0 = 0 and go on from low's otherwise. */
INLINE void shrink(const lora_weights *w, int m, const float *x, int64_t xs, int64_t n, int64_t k0, float *low,
                   int bf16) {
  for (int64_t r0 = 0; r0 < w->rank_pad; r0 += W) {
    vec acc[MR];
    for (int i = 0; i < m; i++) acc[i] = k0 == 0 ? (vec){0} : load(low, i * w->rank_pad + r0, 0);
    int64_t a = r0 * w->in_dim + k0 * W;
    for (int64_t k = 0; k < n; k++) {
      vec ak = load(w->at, a + k * W, bf16);
      for (int i = 0; i < m; i++) acc[i] += x[i * xs + k] * ak;
    }
    for (int i = 0; i < m; i++) store(low, i * w->rank_pad + r0, acc[i], 0);
  }
}

/* y[i, c] += sum_r low[i, r] B^T[r, c] over every block, m <= MR rows. */
INLINE void expand(const lora_weights *w, int m, const float *low, void *y, int64_t ys, int bf16) {
  for (int64_t b = 0; b < w->num_blocks; b++) {
    const int64_t *blk = w->blocks + 5 * b;
    int64_t r0 = blk[0], rows = blk[1] - blk[0], c0 = blk[2], c1 = blk[3];
    int64_t tile = blk[4]; /* the current tile's first element in bt */
    int64_t c = c0;
    for (; c + W <= c1; c += W, tile += rows * W) {
      vec acc[MR];
      for (int i = 0; i < m; i++) acc[i] = load(y, i * ys + c, bf16);
      for (int64_t r = 0; r < rows; r++) {
        vec br = load(w->bt, tile + r * W, bf16);
        for (int i = 0; i < m; i++) acc[i] += low[i * w->rank_pad + r0 + r] * br;
      }
      for (int i = 0; i < m; i++) store(y, i * ys + c, acc[i], bf16);
    }
    /* The last, partial tile (`tile` is at it now): the same sums, column by column. */
    for (int64_t j = 0; c < c1; c++, j++)
      for (int i = 0; i < m; i++) {
        float s = load1(y, i * ys + c, bf16);
        for (int64_t r = 0; r < rows; r++) s += low[i * w->rank_pad + r0 + r] * load1(w->bt, tile + r * W + j, bf16);
        store1(y, i * ys + c, s, bf16);
      }
  }
}

/* m <= MR rows. bfloat16 rows of x are widened once per chunk of XC columns, not once per rank tile;
 * the shrink's sums carry over in `low` from one chunk to the next, in the same order. */
#define XC 256
INLINE void rows(const lora_weights *w, int m, const void *x, int64_t xs, void *y, int64_t ys, int bf16) {
  float low[MR * w->rank_pad];
  if (bf16) {
    float wide[MR * XC];
    for (int64_t k0 = 0; k0 < w->in_dim; k0 += XC) {
      int64_t n = w->in_dim - k0 < XC ? w->in_dim - k0 : XC;
      for (int i = 0; i < m; i++) {
        int64_t k = 0;
        for (; k + W <= n; k += W) store(wide, i * XC + k, load(x, i * xs + k0 + k, 1), 0);
        for (; k < n; k++) wide[i * XC + k] = load1(x, i * xs + k0 + k, 1);
      }
      shrink(w, m, wide, XC, n, k0, low, 1);
    }
  } else {
    shrink(w, m, (const float *)x, xs, w->in_dim, 0, low, 0);
  }
  expand(w, m, low, y, ys, bf16);
}

/* A constant row count for each inlined copy, so that the accumulators stay in registers. */
#define BY_ROWS(m, call) \
  switch (m) {           \
    case 8: call(8); break; \
    case 7: call(7); break; \
    case 6: call(6); break; \
    case 5: call(5); break; \
    case 4: call(4); break; \
    case 3: call(3); break; \
    case 2: call(2); break; \
    case 1: call(1); break; \
    default: break; /* never: 1 <= m <= MR */ \
  }

/* Rows [first, first + MR) of the n, or fewer at the end; x and y point at row 0. */
INLINE void row_block(const lora_weights *w, int64_t n, int64_t first, const void *x, int64_t xs, void *y,
                      int64_t ys, int bf16) {
  int m = n - first < MR ? (int)(n - first) : MR;
  const void *xb = bf16 ? (const void *)((const uint16_t *)x + first * xs) : (const void *)((const float *)x + first * xs);
  void *yb = bf16 ? (void *)((uint16_t *)y + first * ys) : (void *)((float *)y + first * ys);
#define ROWS(M) rows(w, M, xb, xs, yb, ys, bf16)
  BY_ROWS(m, ROWS)
#undef ROWS
}

/* One copy of the row loop per element type. */
typedef void (*row_block_fn)(const lora_weights *, int64_t, int64_t, const void *, int64_t, void *, int64_t);

static void row_block_f32(const lora_weights *w, int64_t n, int64_t first, const void *x, int64_t xs, void *y,
                          int64_t ys) {
  row_block(w, n, first, x, xs, y, ys, 0);
}

static void row_block_bf16(const lora_weights *w, int64_t n, int64_t first, const void *x, int64_t xs, void *y,
                           int64_t ys) {
  row_block(w, n, first, x, xs, y, ys, 1);
}

/* The n rows of x (row stride xs, columns contiguous) add their delta to the n rows of y (row stride ys). */
static void add_rows(row_block_fn block, const lora_weights *w, int64_t n, const void *x, int64_t xs, void *y,
                     int64_t ys, int64_t threads) {
  if (w->num_blocks == 0 || n <= 0) return; /* the adapter does not touch this projection */
#ifdef _OPENMP
  if (threads > 1 && n >= PARALLEL_ROWS) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < n; first += MR) block(w, n, first, x, xs, y, ys);
    return;
  }
#else
  (void)threads;
#endif
  for (int64_t first = 0; first < n; first += MR) block(w, n, first, x, xs, y, ys);
}

typedef struct {
  int64_t start, end;        /* the segment's rows */
  const lora_weights *sites; /* its adapter's weights, one entry per layer and fused projection */
} lora_segment;

static void step(row_block_fn block, int64_t elem_size, const lora_segment *segments, int64_t num_segments,
                 int64_t site, const char *x, int64_t xs, char *y, int64_t ys, int64_t threads) {
  for (int64_t s = 0; s < num_segments; s++) {
    const lora_segment *seg = segments + s;
    add_rows(block, seg->sites + site, seg->end - seg->start, x + seg->start * xs * elem_size, xs,
             y + seg->start * ys * elem_size, ys, threads);
  }
}

/* One projection of one step: each segment's rows of y get their adapter's delta for projection `site`.
 * Strides are in elements. */
void chatmed_lora_step(const lora_segment *segments, int64_t num_segments, int64_t site, const float *x,
                       int64_t xs, float *y, int64_t ys, int64_t threads) {
  step(row_block_f32, 4, segments, num_segments, site, (const char *)x, xs, (char *)y, ys, threads);
}

void chatmed_lora_step_bf16(const lora_segment *segments, int64_t num_segments, int64_t site, const uint16_t *x,
                            int64_t xs, uint16_t *y, int64_t ys, int64_t threads) {
  step(row_block_bf16, 2, segments, num_segments, site, (const char *)x, xs, (char *)y, ys, threads);
}
