/* The CPU's LoRA delta for one projection and one adapter: y[i, :] += (x[i, :] A^T) B^T.
 *
 * Why a kernel of our own: at decode sizes (a few rows, rank 8 to 64) the work is small and runs right
 * after a large matmul has flushed the caches, so it waits on memory. Two torch matmuls per segment read
 * the weights on one core; here a few rows split the weights between torch's threads, and the zero
 * blocks of a fused projection's block-diagonal B are skipped.
 *
 * Every row is computed in one fixed order whatever the other rows of the step and the thread count:
 * the shrink sums the input dimension in num_chunks(in_dim) chunks, each from zero, then adds the chunks
 * in order; the expand adds the rank terms in order to y. So a sequence's result never depends on what it
 * is batched with.
 *
 * Weights come packed by engine/model/lora_cpu.py in column tiles of W floats, so every inner loop reads
 * memory in order:
 *   at: [rank_pad / W][in_dim][W]   A^T, rank padded with zero columns up to a multiple of W;
 *   bt: per block, [ceil(cols / W)][rows][W]   the block's rows of B^T, columns padded with zeros.
 * Built by the engine with the host's C compiler; float32. With OpenMP it runs on the OpenMP runtime torch
 * has loaded (the same libgomp, so the same threads).
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define W 16          /* floats per vector: one AVX-512 register, two AVX2 ones, four NEON ones */
#define MR 8          /* rows computed together */
#define KCHUNK 256    /* the shrink's input-dimension chunk, at least ... */
#define MAX_CHUNKS 8  /* ... and at most this many chunks */
#define SPLIT_ROWS 32 /* up to this many rows, threads split the weights; beyond, they split the rows */

typedef float vec __attribute__((vector_size(4 * W)));
typedef float vec_u __attribute__((vector_size(4 * W), aligned(4))); /* the same, unaligned access */

typedef struct {
  int64_t in_dim, rank_pad, num_blocks, num_tiles;
  const float *at;
  const float *bt;
  /* [num_blocks, 5]: rank rows [r0, r1) add to output columns [c0, c1); the block's offset in bt */
  const int64_t *blocks;
} lora_weights;

#define INLINE static inline __attribute__((always_inline))

INLINE vec load(const float *p) { return *(const vec_u *)p; }
INLINE void store(float *p, vec v) { *(vec_u *)p = v; }

INLINE int64_t num_chunks(int64_t in_dim) {
  int64_t c = (in_dim + KCHUNK - 1) / KCHUNK;
  return c < 1 ? 1 : c > MAX_CHUNKS ? MAX_CHUNKS : c;
}

/* part[i, :] = x[i, k0:k1] A^T[k0:k1, :] for m rows, summed from zero; with `add`, low[i, :] += that. */
INLINE void shrink_chunk(const lora_weights *w, int m, const float *x, int64_t xs, int64_t k0, int64_t k1,
                         float *out, int add) {
  for (int64_t r0 = 0; r0 < w->rank_pad; r0 += W) {
    vec acc[MR];
    for (int i = 0; i < m; i++) acc[i] = (vec){0};
    const float *a = w->at + r0 * w->in_dim;
    for (int64_t k = k0; k < k1; k++) {
      vec ak = load(a + k * W);
      for (int i = 0; i < m; i++) acc[i] += x[i * xs + k] * ak;
    }
    for (int i = 0; i < m; i++) {
      float *o = out + i * w->rank_pad + r0;
      store(o, add ? load(o) + acc[i] : acc[i]);
    }
  }
}

/* y[i, c] += sum_r low[i, r] B^T[r, c] over the column tiles [tile0, tile1) of all blocks, m rows. */
INLINE void expand_tiles(const lora_weights *w, int m, const float *low, float *y, int64_t ys,
                         int64_t tile0, int64_t tile1) {
  int64_t index = 0;
  for (int64_t b = 0; b < w->num_blocks && index < tile1; b++) {
    const int64_t *blk = w->blocks + 5 * b;
    int64_t r0 = blk[0], rows = blk[1] - blk[0], c0 = blk[2], c1 = blk[3];
    int64_t tiles = (c1 - c0 + W - 1) / W;
    int64_t q = tile0 > index ? tile0 - index : 0, q1 = tile1 - index < tiles ? tile1 - index : tiles;
    index += tiles;
    for (; q < q1; q++) {
      const float *tile = w->bt + blk[4] + q * rows * W;
      int64_t c = c0 + q * W;
      if (c + W <= c1) {
        vec acc[MR];
        for (int i = 0; i < m; i++) acc[i] = load(y + i * ys + c);
        for (int64_t r = 0; r < rows; r++) {
          vec br = load(tile + r * W);
          for (int i = 0; i < m; i++) acc[i] += low[i * w->rank_pad + r0 + r] * br;
        }
        for (int i = 0; i < m; i++) store(y + i * ys + c, acc[i]);
      } else { /* the block's last, partial tile: the same sums, one column at a time */
        for (int64_t j = 0; c < c1; c++, j++)
          for (int i = 0; i < m; i++) {
            float s = y[i * ys + c];
            for (int64_t r = 0; r < rows; r++) s += low[i * w->rank_pad + r0 + r] * tile[r * W + j];
            y[i * ys + c] = s;
          }
      }
    }
  }
}

/* m <= MR rows on this thread. */
INLINE void rows_serial(const lora_weights *w, int m, const float *x, int64_t xs, float *y, int64_t ys) {
  float low[MR * w->rank_pad];
  int64_t chunks = num_chunks(w->in_dim);
  for (int64_t c = 0; c < chunks; c++)
    shrink_chunk(w, m, x, xs, w->in_dim * c / chunks, w->in_dim * (c + 1) / chunks, low, c > 0);
  expand_tiles(w, m, low, y, ys, 0, w->num_tiles);
}

/* m <= MR rows, the weights split between `threads` threads: the shrink by chunks, the expand by tiles. */
INLINE void rows_split(const lora_weights *w, int m, const float *x, int64_t xs, float *y, int64_t ys,
                       int threads) {
#ifdef _OPENMP
  int64_t chunks = num_chunks(w->in_dim);
  float part[chunks][MR * w->rank_pad];
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t c = t; c < chunks; c += team)
      shrink_chunk(w, m, x, xs, w->in_dim * c / chunks, w->in_dim * (c + 1) / chunks, part[c], 0);
#pragma omp barrier
    float low[MR * w->rank_pad];
    for (int i = 0; i < m; i++)
      for (int64_t r = 0; r < w->rank_pad; r += W) {
        vec s = load(part[0] + i * w->rank_pad + r);
        for (int64_t c = 1; c < chunks; c++) s += load(part[c] + i * w->rank_pad + r);
        store(low + i * w->rank_pad + r, s);
      }
    expand_tiles(w, m, low, y, ys, w->num_tiles * t / team, w->num_tiles * (t + 1) / team);
  }
#else
  (void)threads;
  rows_serial(w, m, x, xs, y, ys);
#endif
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
    default: break;      \
  }

static void row_block(const lora_weights *w, int64_t n, int64_t first, const float *x, int64_t xs, float *y,
                      int64_t ys, int threads) {
  int m = n - first < MR ? (int)(n - first) : MR;
  x += first * xs;
  y += first * ys;
#define SERIAL(M) rows_serial(w, M, x, xs, y, ys)
#define SPLIT(M) rows_split(w, M, x, xs, y, ys, threads)
  if (threads > 1) {
    BY_ROWS(m, SPLIT)
  } else {
    BY_ROWS(m, SERIAL)
  }
#undef SERIAL
#undef SPLIT
}

/* The n rows of x (row stride xs, columns contiguous) add their delta to the n rows of y (row stride ys),
 * on up to `threads` threads. */
static void add_rows(const lora_weights *w, int64_t n, const float *x, int64_t xs, float *y, int64_t ys,
                     int64_t threads) {
  if (w->num_blocks == 0 || n <= 0) return; /* the adapter does not touch this projection */
#ifdef _OPENMP
  if (threads > 1 && n > SPLIT_ROWS) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < n; first += MR) row_block(w, n, first, x, xs, y, ys, 1);
    return;
  }
#else
  threads = 1;
#endif
  for (int64_t first = 0; first < n; first += MR) row_block(w, n, first, x, xs, y, ys, (int)threads);
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
