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
 * Weights come packed by engine/model/lora_cpu.py in column tiles of W floats, so every inner loop reads
 * memory in order:
 *   at: [rank_pad / W][in_dim][W]   A^T, rank padded with zero columns up to a multiple of W;
 *   bt: per block, [ceil(cols / W)][rows][W]   the block's rows of B^T, columns padded with zeros.
 * Built by the engine with the host's C compiler; float32. Many rows (a prefill) are split between torch's
 * threads: with OpenMP the kernel runs on the runtime torch has loaded (the same libgomp, so the same
 * threads). A few rows stay on the calling thread: splitting so little work lost more to waiting at the
 * barrier, whenever another thread (the server's event loop) held a core, than it gained.
 */
#include <stdint.h>

#define W 16           /* floats per vector: one AVX-512 register, two AVX2 ones, four NEON ones */
#define MR 8           /* rows computed together */
#define PARALLEL_ROWS 64 /* from this many rows of one adapter, row blocks are split between threads */

typedef float vec __attribute__((vector_size(4 * W)));
typedef float vec_u __attribute__((vector_size(4 * W), aligned(4))); /* the same, unaligned access */

typedef struct {
  int64_t in_dim, rank_pad, num_blocks;
  const float *at;
  const float *bt;
  /* [num_blocks, 5]: rank rows [r0, r1) add to output columns [c0, c1); the block's offset in bt */
  const int64_t *blocks;
} lora_weights;

#define INLINE static inline __attribute__((always_inline))

INLINE vec load(const float *p) { return *(const vec_u *)p; }
INLINE void store(float *p, vec v) { *(vec_u *)p = v; }

/* low[i, :] = x[i, :] A^T for m <= MR rows. */
INLINE void shrink(const lora_weights *w, int m, const float *x, int64_t xs, float *low) {
  for (int64_t r0 = 0; r0 < w->rank_pad; r0 += W) {
    vec acc[MR];
    for (int i = 0; i < m; i++) acc[i] = (vec){0};
    const float *a = w->at + r0 * w->in_dim;
    for (int64_t k = 0; k < w->in_dim; k++) {
      vec ak = load(a + k * W);
      for (int i = 0; i < m; i++) acc[i] += x[i * xs + k] * ak;
    }
    for (int i = 0; i < m; i++) store(low + i * w->rank_pad + r0, acc[i]);
  }
}

/* y[i, c] += sum_r low[i, r] B^T[r, c] over every block, m <= MR rows. */
INLINE void expand(const lora_weights *w, int m, const float *low, float *y, int64_t ys) {
  for (int64_t b = 0; b < w->num_blocks; b++) {
    const int64_t *blk = w->blocks + 5 * b;
    int64_t r0 = blk[0], rows = blk[1] - blk[0], c0 = blk[2], c1 = blk[3];
    const float *tile = w->bt + blk[4];
    int64_t c = c0;
    for (; c + W <= c1; c += W, tile += rows * W) {
      vec acc[MR];
      for (int i = 0; i < m; i++) acc[i] = load(y + i * ys + c);
      for (int64_t r = 0; r < rows; r++) {
        vec br = load(tile + r * W);
        for (int i = 0; i < m; i++) acc[i] += low[i * w->rank_pad + r0 + r] * br;
      }
      for (int i = 0; i < m; i++) store(y + i * ys + c, acc[i]);
    }
    /* The last, partial tile (`tile` points at it now): the same sums, column by column. */
    for (int64_t j = 0; c < c1; c++, j++)
      for (int i = 0; i < m; i++) {
        float s = y[i * ys + c];
        for (int64_t r = 0; r < rows; r++) s += low[i * w->rank_pad + r0 + r] * tile[r * W + j];
        y[i * ys + c] = s;
      }
  }
}

/* m <= MR rows. */
INLINE void rows(const lora_weights *w, int m, const float *x, int64_t xs, float *y, int64_t ys) {
  float low[MR * w->rank_pad];
  shrink(w, m, x, xs, low);
  expand(w, m, low, y, ys);
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

/* Rows [first, first + MR) of the n, or fewer at the end. */
static void row_block(const lora_weights *w, int64_t n, int64_t first, const float *x, int64_t xs, float *y,
                      int64_t ys) {
  int m = n - first < MR ? (int)(n - first) : MR;
  x += first * xs;
  y += first * ys;
#define ROWS(M) rows(w, M, x, xs, y, ys)
  BY_ROWS(m, ROWS)
#undef ROWS
}

/* The n rows of x (row stride xs, columns contiguous) add their delta to the n rows of y (row stride ys). */
static void add_rows(const lora_weights *w, int64_t n, const float *x, int64_t xs, float *y, int64_t ys,
                     int64_t threads) {
  if (w->num_blocks == 0 || n <= 0) return; /* the adapter does not touch this projection */
#ifdef _OPENMP
  if (threads > 1 && n >= PARALLEL_ROWS) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < n; first += MR) row_block(w, n, first, x, xs, y, ys);
    return;
  }
#else
  (void)threads;
#endif
  for (int64_t first = 0; first < n; first += MR) row_block(w, n, first, x, xs, y, ys);
}

typedef struct {
  int64_t start, end;        /* the segment's rows */
  const lora_weights *sites; /* its adapter's weights, one entry per layer and fused projection */
} lora_segment;

/* One projection of one step: each segment's rows of y get their adapter's delta for projection `site`. */
void chatmed_lora_step(const lora_segment *segments, int64_t num_segments, int64_t site, const float *x,
                       int64_t xs, float *y, int64_t ys, int64_t threads) {
  for (int64_t s = 0; s < num_segments; s++) {
    const lora_segment *seg = segments + s;
    add_rows(seg->sites + site, seg->end - seg->start, x + seg->start * xs, xs, y + seg->start * ys, ys,
             threads);
  }
}
