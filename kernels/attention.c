/* minift: attention for the NumPy backend's ATTENTION kernels, softmax(q k^T * scale, masked) v,
   and its gradients for ATTENTION_BACKWARD, ATT_BLOCK queries at a time. The block's scores over
   the keys any of its rows sees stay in a scratch array, so the (T, S) scores are never written
   out, and the masked-off keys of a causal block are skipped; the backward makes them again. The
   products are computed in register tiles of 4 rows; the block's 8 tiles take turns on each tile
   of keys (and of values) while it is in the L1 cache. Unlike the rendered loops, products are
   contracted into FMAs (they are sums over D and over the keys, as BLAS computes them); row sums
   accumulate in double.

   Not a program of its own: minift/backends/numpy/attention.py compiles it after the C loops'
   prelude (exp_f: minift/backends/numpy/cloops.py) and three defines: ATT_BLOCK (query rows per
   unit of work, ATTENTION_ROWS there), ATTENTION_NAME and ATTENTION_BACKWARD_NAME (the two
   functions' names, hashes of this source and the compiler). */
#include <stdlib.h>

#define ATT_ROWS 4                 /* query rows per register tile */
#ifdef __AVX512F__
#define ATT_W 4                    /* 16-float vectors per register tile: 16 of 32 registers hold the sums */
#elif defined(__ARM_NEON)
#define ATT_W 1                    /* NEON: a 16-float vector is 4 of the 32 q registers, so the 4 x 1 tile's sums
                                      take 16 and its B row 4; 2 wide would need 40 and spill (not timed on a core yet) */
#else
#define ATT_W 1                    /* AVX2: 16 ymm registers, of which the 4 x 1 tile takes 10 */
#endif
#define ATT_TILE (16 * ATT_W)
typedef float att_v16 __attribute__((vector_size(64), aligned(4)));
#if defined(__GNUC__) && !defined(__clang__)
#define ATT_CONTRACT __attribute__((optimize("fp-contract=fast")))   /* gcc inlines only into functions that have it too */
#else
#define ATT_CONTRACT
#endif
#define ATT_FN static inline ATT_CONTRACT

/* The one register tile every product here is made of: 4 rows x 16 w columns of
   dst[r][..] (+)= sum_{i < n} a[i * a_i + r * a_r] * b[i * b_i ..] (a sum of n outer products).
   The scores are (q tiles) x (keys transposed), the outputs and dq (probabilities) x (rows of
   values or keys), dk and dv (probabilities, transposed) x (rows of queries or output grads). */
ATT_FN void att_tile(const float* a, long a_i, long a_r, const float* b, long b_i, long n, float* dst, long ds, int accumulate, const int w) {
#ifdef __clang__
  _Pragma("clang fp contract(fast)")
#endif
  att_v16 acc[ATT_ROWS][ATT_W];
  for (int r = 0; r < ATT_ROWS; r++) for (int c = 0; c < w; c++) acc[r][c] = accumulate ? *(att_v16*)(dst + r * ds + 16 * c) : (att_v16){0};
  for (long i = 0; i < n; i++) {
    att_v16 bv[ATT_W];
    for (int c = 0; c < w; c++) bv[c] = *(const att_v16*)(b + i * b_i + 16 * c);
    for (int r = 0; r < ATT_ROWS; r++) {
      float x = a[i * a_i + r * a_r];
      for (int c = 0; c < w; c++) acc[r][c] += x * bv[c];
    }
  }
  for (int r = 0; r < ATT_ROWS; r++) for (int c = 0; c < w; c++) *(att_v16*)(dst + r * ds + 16 * c) = acc[r][c];
}

/* src (S, n) rows to dst (n, sp), zeros in columns S .. sp; 16 rows at a time: whole cache lines */
static void att_transpose(const float* src, long S, long n, long sp, float* dst) {
  for (long j0 = 0; j0 < S; j0 += 16)
    for (long d = 0; d < n; d++) for (long j = j0; j < j0 + 16 && j < S; j++) dst[d * sp + j] = src[j * n + d];
  for (long d = 0; d < n; d++) for (long j = S; j < sp; j++) dst[d * sp + j] = 0.0f;
}

/* rows [0, rows) of src (n wide, times scale) into dst as 4-row tiles (n, 4) ("tiles") and as
   rows padded to np wide ("padded", where not NULL); zeros for the rows after them */
static void att_load_rows(const float* src, long rows, long n, float scale, float* tiles, float* padded, long np) {
  long ntiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
  for (long t = 0; t < ntiles; t++)
    for (long d = 0; d < n; d++) for (int r = 0; r < ATT_ROWS; r++) {
      long row = t * ATT_ROWS + r;
      tiles[(t * n + d) * ATT_ROWS + r] = row < rows ? src[row * n + d] * scale : 0.0f;
    }
  if (padded) for (long r = 0; r < rows; r++) for (long c = 0; c < np; c++) padded[r * np + c] = c < n ? src[r * n + c] * scale : 0.0f;
}

/* sc[r][j] for the block's tiles and keys [j0, j1): sum over d of tiles[d][r] * kt[d][j] */
static inline void att_block_scores(const float* tiles, long ntiles, const float* kt, long sp, long n, long j0, long j1, float* sc) {
  for (long j = j0; j < j1; ) {
    int w = j + ATT_TILE <= j1 ? ATT_W : 1;
    for (long t = 0; t < ntiles; t++) {
      const float* a = tiles + t * n * ATT_ROWS;
      if (w == ATT_W) att_tile(a, ATT_ROWS, 1, kt + j, sp, n, sc + t * ATT_ROWS * sp + j, sp, 0, ATT_W);
      else att_tile(a, ATT_ROWS, 1, kt + j, sp, n, sc + t * ATT_ROWS * sp + j, sp, 0, 1);
    }
    j += 16 * w;
  }
}

/* o[r][0 .. np) = sum_{j in [j0, j1)} p[r][j] * rows[j][..] for the block's tiles (rows np wide) */
static inline void att_block_products(const float* p, long ntiles, long sp, const float* rows, long np, long j0, long j1, float* o) {
  for (long c = 0; c < np; ) {
    int w = c + ATT_TILE <= np ? ATT_W : 1;
    for (long jc = j0; jc < j1 || jc == j0; jc += 64) {   /* 64 keys' rows at a time, shared by the block's tiles */
      long jend = jc + 64 < j1 ? jc + 64 : j1;
      for (long t = 0; t < ntiles; t++) {
        const float* a = p + t * ATT_ROWS * sp + jc;
        float* dst = o + t * ATT_ROWS * np + c;
        if (w == ATT_W) att_tile(a, 1, sp, rows + jc * np + c, np, jend - jc, dst, np, jc != j0, ATT_W);
        else att_tile(a, 1, sp, rows + jc * np + c, np, jend - jc, dst, np, jc != j0, 1);
      }
    }
    c += 16 * w;
  }
}

/* the keys [r0, r1) query row a (aligned with key a) sees, within the block's [j0, j1) */
static inline void att_row_keys(long a, long causal, long window, long S, long j0, long j1, long* r0, long* r1) {
  long lo = window > 0 ? a - window + 1 : 0, hi = causal ? a + 1 : S;
  if (lo < j0) lo = j0;
  if (hi > j1) hi = j1;
  if (hi < lo) hi = lo;
  *r0 = lo; *r1 = hi;
}

/* the keys [j0, j1) some query of the block [i0, i0 + rows) sees: from its first row's first key
   to its last row's last */
static inline void att_block_keys(long i0, long rows, long off, long causal, long window, long S, long* j0, long* j1) {
  long unused;
  att_row_keys(i0 + off, causal, window, S, 0, S, j0, &unused);
  att_row_keys(i0 + rows - 1 + off, causal, window, S, 0, S, &unused, j1);
  if (*j1 < *j0) *j1 = *j0;
}

/* s[r0 .. r1) = exp(s - max), zeros elsewhere in [j0, j1 + 4); returns their sum. Not contracted
   and never inlined into the contracted functions: exp_f's polynomial with FMAs (as gcc made it
   there) rounds otherwise than without (as clang made it), so the probabilities would depend on
   the compiler; the products alone are contracted, as BLAS's are. */
__attribute__((noinline)) static double att_exp_row(float* s, long j0, long r0, long r1, long j1) {
  float m = -INFINITY;   /* (a NaN score need not reach m: exp(NaN - m) makes the row's sum NaN) */
#pragma omp simd reduction(max:m)
  for (long x = r0; x < r1; x++) m = m > s[x] ? m : s[x];
  double l = 0.0;
#pragma omp simd reduction(+:l)
  for (long x = r0; x < r1; x++) { float e = exp_f(s[x] - m); s[x] = e; l += (double)e; }
  for (long x = j0; x < r0; x++) s[x] = 0.0f;
  for (long x = r1; x < j1 + 4; x++) s[x] = 0.0f;
  return l;
}

/* out (B, Hq, T, Dv) from q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), all contiguous.
   Query i (aligned with key i + S - T) sees keys j <= i + S - T when causal, and, with a window
   (> 0), only j > i + S - T - window. Units [lo, hi) of the B * Hq * ceil(T / ATT_BLOCK) query
   blocks: one part of the work. failed[0] is set where the scratch memory could not be had.
   Arguments packed in a (every compiled loop's signature: minift/backends/numpy/parallel.py). */
ATT_CONTRACT void ATTENTION_NAME(const intptr_t* a, long lo, long hi) {
  float* out = (float*)a[0];
  const float *q = (const float*)a[1], *k = (const float*)a[2], *v = (const float*)a[3];
  int32_t* failed = (int32_t*)a[4];
  const float scale = *(const float*)a[5];
  const long B = a[6], Hq = a[7], Hkv = a[8], T = a[9], S = a[10], D = a[11], Dv = a[12], causal = a[13], window = a[14];
  long G = Hq / Hkv, off = S - T, blocks = (T + ATT_BLOCK - 1) / ATT_BLOCK;
  long sp = (S + ATT_TILE - 1) / ATT_TILE * ATT_TILE + ATT_TILE;   /* a tile may start anywhere below S */
  long dvp = (Dv + 15) / 16 * 16, vp_size = dvp == Dv ? 0 : S * dvp;
  float* kt = malloc(sizeof(float) * (D * sp + vp_size + ATT_BLOCK * (sp + D + dvp)));
  if (!kt) { failed[0] = 1; return; }
  float *vp = kt + D * sp, *sc = vp + vp_size, *qs = sc + ATT_BLOCK * sp, *o = qs + ATT_BLOCK * D;
  long packed = -1;
  for (long u = lo; u < hi; u++) {
    long bh = u / blocks, i0 = (u % blocks) * ATT_BLOCK, b = bh / Hq, h = bh % Hq, kvh = b * Hkv + h / G;
    long rows = T - i0 < ATT_BLOCK ? T - i0 : ATT_BLOCK, tiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
    if (kvh != packed) {   /* this (batch, kv head)'s keys as (D, sp), its values as rows dvp wide */
      const float* V = v + kvh * S * Dv;
      att_transpose(k + kvh * S * D, S, D, sp, kt);
      if (dvp == Dv) vp = (float*)V;
      else for (long j = 0; j < S; j++) for (long c = 0; c < dvp; c++) vp[j * dvp + c] = c < Dv ? V[j * Dv + c] : 0.0f;
      packed = kvh;
    }
    att_load_rows(q + (bh * T + i0) * D, rows, D, scale, qs, 0, 0);
    long j0, j1;
    att_block_keys(i0, rows, off, causal, window, S, &j0, &j1);
    att_block_scores(qs, tiles, kt, sp, D, j0, j1, sc);
    double sums[ATT_BLOCK];
    for (long r = 0; r < rows; r++) {
      long r0, r1;
      att_row_keys(i0 + r + off, causal, window, S, j0, j1, &r0, &r1);
      sums[r] = att_exp_row(sc + r * sp, j0, r0, r1, j1);
    }
    att_block_products(sc, tiles, sp, vp, dvp, j0, j1, o);
    for (long r = 0; r < rows; r++) {
      float l = (float)sums[r];
      for (long x = 0; x < Dv; x++) out[(bh * T + i0 + r) * Dv + x] = o[r * dvp + x] / l;
    }
  }
  free(kt);
}

/* The gradients of ATTENTION_NAME's out (dout, (B, Hq, T, Dv)) with respect to q, k and v, written
   one after the other into out. The softmax is made again from the scores (nothing of the forward
   is kept); with P = softmax and dP = dout v^T, dS = P (dP - rowsum(P dP)), and
   dq = scale dS k, dk = scale dS^T q, dv = P^T dout. Units [lo, hi) of the B * Hkv (batch, kv
   head) pairs: a part owns the keys' and values' gradients of its pairs. */
ATT_CONTRACT void ATTENTION_BACKWARD_NAME(const intptr_t* a, long lo, long hi) {
  float* out = (float*)a[0];
  const float *q = (const float*)a[1], *k = (const float*)a[2], *v = (const float*)a[3], *dout = (const float*)a[4];
  int32_t* failed = (int32_t*)a[5];
  const float scale = *(const float*)a[6];
  const long B = a[7], Hq = a[8], Hkv = a[9], T = a[10], S = a[11], D = a[12], Dv = a[13], causal = a[14], window = a[15];
  long G = Hq / Hkv, off = S - T;
  long sp = (S + ATT_TILE - 1) / ATT_TILE * ATT_TILE + ATT_TILE;
  long dp = (D + 15) / 16 * 16, dvp = (Dv + 15) / 16 * 16;
  float *dq = out, *dk = out + B * Hq * T * D, *dv = dk + B * Hkv * S * D;
  float* kt = malloc(sizeof(float) * (D * sp + Dv * sp + 2 * sp * dp + sp * dvp + ATT_BLOCK * (2 * sp + D + Dv + 2 * dp + dvp)));
  if (!kt) { failed[0] = 1; return; }
  float *vt = kt + D * sp, *kp = vt + Dv * sp, *dka = kp + sp * dp, *dva = dka + sp * dp;
  float *sc = dva + sp * dvp, *ds = sc + ATT_BLOCK * sp, *qs = ds + ATT_BLOCK * sp, *dos = qs + ATT_BLOCK * D;
  float *qr = dos + ATT_BLOCK * Dv, *dor = qr + ATT_BLOCK * dp, *o = dor + ATT_BLOCK * dvp;
  for (long u = lo; u < hi; u++) {
    const float *K = k + u * S * D, *V = v + u * S * Dv;
    long b = u / Hkv, kvh = u % Hkv;
    att_transpose(K, S, D, sp, kt);
    att_transpose(V, S, Dv, sp, vt);
    for (long j = 0; j < sp; j++) for (long c = 0; c < dp; c++) kp[j * dp + c] = j < S && c < D ? K[j * D + c] : 0.0f;
    for (long x = 0; x < sp * dp; x++) dka[x] = 0.0f;
    for (long x = 0; x < sp * dvp; x++) dva[x] = 0.0f;
    for (long h = kvh * G; h < (kvh + 1) * G; h++) {
      long bh = b * Hq + h;
      for (long i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        long rows = T - i0 < ATT_BLOCK ? T - i0 : ATT_BLOCK, tiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
        att_load_rows(q + (bh * T + i0) * D, rows, D, scale, qs, qr, dp);
        att_load_rows(dout + (bh * T + i0) * Dv, rows, Dv, 1.0f, dos, dor, dvp);
        long j0, j1;
        att_block_keys(i0, rows, off, causal, window, S, &j0, &j1);
        att_block_scores(qs, tiles, kt, sp, D, j0, j1, sc);     /* scores */
        att_block_scores(dos, tiles, vt, sp, Dv, j0, j1, ds);   /* dP */
        for (long r = 0; r < rows; r++) {
          float *p = sc + r * sp, *g = ds + r * sp;
          long r0, r1;
          att_row_keys(i0 + r + off, causal, window, S, j0, j1, &r0, &r1);
          float inv = (float)(1.0 / att_exp_row(p, j0, r0, r1, j1));
          double dot = 0.0;
#pragma omp simd reduction(+:dot)
          for (long x = r0; x < r1; x++) { p[x] *= inv; dot += (double)(p[x] * g[x]); }
          float rowsum = (float)dot;
          for (long x = j0; x < r0; x++) g[x] = 0.0f;
#pragma omp simd
          for (long x = r0; x < r1; x++) g[x] = p[x] * (g[x] - rowsum);
          for (long x = r1; x < j1 + 4; x++) g[x] = 0.0f;
        }
        att_block_products(ds, tiles, sp, kp, dp, j0, j1, o);   /* dS k */
        for (long r = 0; r < rows; r++) for (long x = 0; x < D; x++) dq[(bh * T + i0 + r) * D + x] = o[r * dp + x] * scale;
        for (long j = j0; j < j1; j += ATT_ROWS) {   /* 4 keys at a time; the scores past j1 are zeros */
          long c = 0;
          for (; c + ATT_TILE <= dp; c += ATT_TILE) att_tile(ds + j, sp, 1, qr + c, dp, rows, dka + j * dp + c, dp, 1, ATT_W);
          for (; c < dp; c += 16) att_tile(ds + j, sp, 1, qr + c, dp, rows, dka + j * dp + c, dp, 1, 1);
          for (c = 0; c + ATT_TILE <= dvp; c += ATT_TILE) att_tile(sc + j, sp, 1, dor + c, dvp, rows, dva + j * dvp + c, dvp, 1, ATT_W);
          for (; c < dvp; c += 16) att_tile(sc + j, sp, 1, dor + c, dvp, rows, dva + j * dvp + c, dvp, 1, 1);
        }
      }
    }
    for (long j = 0; j < S; j++) {
      for (long x = 0; x < D; x++) dk[(u * S + j) * D + x] = dka[j * dp + x];
      for (long x = 0; x < Dv; x++) dv[(u * S + j) * Dv + x] = dva[j * dvp + x];
    }
  }
  free(kt);
}
