// qmatmul.c: the NumPy backend's loops over quantized weights (minift/backends/numpy/quant.py
// drives them; kernels/dequant.h, included before this, decodes the blocks). For each type T:
//
// dqb_T below decodes a whole block (dequant.h's dq_T_at decodes one value: the OpenCL kernels'
// tile loads use it).
//
// Arguments come packed in an array (every compiled loop's signature: backends/numpy/parallel.py),
// in the order named below.
//
//   QNAME(T, rect)   rows [lo, hi) of a rectangle of blocks into float32: row r's nblocks blocks
//                    start at src + r * row_bytes and land at out + r * out_stride. A panel of a
//                    weight dequantized into a cache-sized scratch that BLAS then multiplies, a
//                    row gathered for an embedding lookup, a whole weight made float32.
//   QNAME(T, gemv)   out[m, r] = sum_k x[m, k] * W[r, k] for rows r in [lo, hi) of W (row r at
//                    w + r * row_bytes, k blocks of it) and m < m_rows <= QMV_ROWS: a decode
//                    step's few rows of activations against the weight read once, each block
//                    dequantized into registers and used for every row of x (no scratch).
//
// lo and hi bound the outermost loop (backends/numpy/parallel.call_in_parts cuts it into one part
// per core).

#ifndef QMV_ROWS
#define QMV_ROWS 8
#endif
// gemv's sums: Q_LANES running float sums per row of x, lane l taking the products of columns
// l, l + Q_LANES, ... (independent chains the compiler turns into vector adds, where one sum per
// block would end every block with a horizontal add), added in double at the end of the row
#define Q_LANES 16

// Whole blocks at a time: the same arithmetic as dequant.h's dq_T_at, with each scale worked out
// once per group of values that share it and the inner loops left for the compiler to vectorise.
static inline uint q_u32(const uchar* p) { return (uint)p[0] | ((uint)p[1] << 8) | ((uint)p[2] << 16) | ((uint)p[3] << 24); }

static inline void dqb_q8_0(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b);
  for (int j = 0; j < 32; j++) o[j] = (float)(signed char)b[2 + j] * d;
}

static inline void dqb_q4_0(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b);
  for (int j = 0; j < 16; j++) o[j] = d * (float)((b[2 + j] & 15) - 8);
  for (int j = 0; j < 16; j++) o[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
}

static inline void dqb_q4_1(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b), m = q_half(b + 2);
  for (int j = 0; j < 16; j++) { const float t = d * (float)(b[4 + j] & 15); o[j] = t + m; }
  for (int j = 0; j < 16; j++) { const float t = d * (float)(b[4 + j] >> 4); o[j + 16] = t + m; }
}

static inline void dqb_q5_0(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b);
  const uint qh = q_u32(b + 2);
  uchar hb[32];   // q's fifth bits, made once: the loops below then shift by constants only
  for (int j = 0; j < 32; j++) hb[j] = (uchar)(((qh >> j) & 1u) << 4);
  for (int j = 0; j < 16; j++) o[j] = d * (float)((int)((b[6 + j] & 15) | hb[j]) - 16);
  for (int j = 0; j < 16; j++) o[j + 16] = d * (float)((int)((b[6 + j] >> 4) | hb[j + 16]) - 16);
}

static inline void dqb_q5_1(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b), m = q_half(b + 2);
  const uint qh = q_u32(b + 4);
  uchar hb[32];
  for (int j = 0; j < 32; j++) hb[j] = (uchar)(((qh >> j) & 1u) << 4);
  for (int j = 0; j < 16; j++) { const float t = d * (float)((b[8 + j] & 15) | hb[j]); o[j] = t + m; }
  for (int j = 0; j < 16; j++) { const float t = d * (float)((b[8 + j] >> 4) | hb[j + 16]); o[j + 16] = t + m; }
}

// q2_k and q3_k: 16 groups of 16 values; group g's 2-bit values are bit pair (g / 2) % 4 of
// bytes 32 * (g / 8) + 16 * (g % 2) ... + 15. SHIFTED(g) runs the groups of one bit pair with a
// constant shift.
static inline void dqb_q2_k(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b + 80), dmin = q_half(b + 82);
  float dl[16], ml[16];
  for (int g = 0; g < 16; g++) { dl[g] = d * (float)(b[g] & 15); ml[g] = dmin * (float)(b[g] >> 4); }
#define Q2_GROUP(g) { const uchar* q = b + 16 + 32 * ((g) >> 3) + 16 * ((g) & 1); \
    for (int i = 0; i < 16; i++) { const float t = dl[g] * (float)((q[i] >> (2 * (((g) >> 1) & 3))) & 3); o[16 * (g) + i] = t - ml[g]; } }
  Q2_GROUP(0) Q2_GROUP(1) Q2_GROUP(2) Q2_GROUP(3) Q2_GROUP(4) Q2_GROUP(5) Q2_GROUP(6) Q2_GROUP(7)
  Q2_GROUP(8) Q2_GROUP(9) Q2_GROUP(10) Q2_GROUP(11) Q2_GROUP(12) Q2_GROUP(13) Q2_GROUP(14) Q2_GROUP(15)
#undef Q2_GROUP
}

static inline void dqb_q3_k(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b + 108);
  const uchar* sc = b + 96;
  float dl[16];
  for (int g = 0; g < 16; g++) {
    const int lo = g < 8 ? (sc[g] & 15) : (sc[g - 8] >> 4), hi = (sc[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
    dl[g] = d * (float)((lo | (hi << 4)) - 32);
  }
#define Q3_GROUP(g) { const uchar* q = b + 32 + 32 * ((g) >> 3) + 16 * ((g) & 1); const uchar* hm = b + 16 * ((g) & 1); \
    for (int i = 0; i < 16; i++) o[16 * (g) + i] = dl[g] * (float)(((q[i] >> (2 * (((g) >> 1) & 3))) & 3) - ((((hm[i] >> ((g) >> 1)) & 1) ^ 1) << 2)); }
  Q3_GROUP(0) Q3_GROUP(1) Q3_GROUP(2) Q3_GROUP(3) Q3_GROUP(4) Q3_GROUP(5) Q3_GROUP(6) Q3_GROUP(7)
  Q3_GROUP(8) Q3_GROUP(9) Q3_GROUP(10) Q3_GROUP(11) Q3_GROUP(12) Q3_GROUP(13) Q3_GROUP(14) Q3_GROUP(15)
#undef Q3_GROUP
}

// q4_k and q5_k: 8 sub-blocks of 32 values; sub-blocks 2c and 2c + 1 are the low and high
// nibbles of bytes 32c ... 32c + 31
static inline void dqb_q4_k(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b), dmin = q_half(b + 2);
  for (int c = 0; c < 4; c++) {
    const float d0 = d * (float)k_scale(b + 4, 2 * c), m0 = dmin * (float)k_min(b + 4, 2 * c);
    const float d1 = d * (float)k_scale(b + 4, 2 * c + 1), m1 = dmin * (float)k_min(b + 4, 2 * c + 1);
    const uchar* q = b + 16 + 32 * c;
    for (int i = 0; i < 32; i++) { const float t = d0 * (float)(q[i] & 15); o[64 * c + i] = t - m0; }
    for (int i = 0; i < 32; i++) { const float t = d1 * (float)(q[i] >> 4); o[64 * c + 32 + i] = t - m1; }
  }
}

static inline void dqb_q5_k(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b), dmin = q_half(b + 2);
  const uchar* qh = b + 16;
  for (int c = 0; c < 4; c++) {
    const float d0 = d * (float)k_scale(b + 4, 2 * c), m0 = dmin * (float)k_min(b + 4, 2 * c);
    const float d1 = d * (float)k_scale(b + 4, 2 * c + 1), m1 = dmin * (float)k_min(b + 4, 2 * c + 1);
    const uchar* q = b + 48 + 32 * c;
    uchar h0[32], h1[32];
    for (int i = 0; i < 32; i++) { h0[i] = (uchar)(((qh[i] >> (2 * c)) & 1) << 4); h1[i] = (uchar)(((qh[i] >> (2 * c + 1)) & 1) << 4); }
    for (int i = 0; i < 32; i++) { const float t = d0 * (float)((q[i] & 15) | h0[i]); o[64 * c + i] = t - m0; }
    for (int i = 0; i < 32; i++) { const float t = d1 * (float)((q[i] >> 4) | h1[i]); o[64 * c + 32 + i] = t - m1; }
  }
}

// q6_k: values h * 128 + 32 * quarter + l (l < 32) take nibble quarter / 2 of ql[64h + 32 * (quarter % 2) + l]
// and bit pair `quarter` of qh[32h + l]; a scale per 16 values
static inline void dqb_q6_k(const uchar* restrict b, float* restrict o) {
  const float d = q_half(b + 208);
  float dg[16];
  for (int g = 0; g < 16; g++) dg[g] = d * (float)(signed char)b[192 + g];
  for (int h = 0; h < 2; h++) {
    const uchar* ql = b + 64 * h;
    const uchar* qh = b + 128 + 32 * h;
    float* oh = o + 128 * h;
    const float* sc = dg + 8 * h;
    for (int l = 0; l < 32; l++) oh[l] = sc[l >> 4] * (float)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
    for (int l = 0; l < 32; l++) oh[32 + l] = sc[2 + (l >> 4)] * (float)(((ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
    for (int l = 0; l < 32; l++) oh[64 + l] = sc[4 + (l >> 4)] * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
    for (int l = 0; l < 32; l++) oh[96 + l] = sc[6 + (l >> 4)] * (float)(((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
  }
}

#define Q_LOOPS(T, QK, BYTES) \
void QNAME(T, rect)(const intptr_t* a, long lo, long hi) { \
  float* out = (float*)a[0]; \
  const uchar* src = (const uchar*)a[1]; \
  const long row_bytes = a[2], nblocks = a[3], out_stride = a[4]; \
  for (long r = lo; r < hi; r++) { \
    const uchar* row = src + r * row_bytes; \
    float* o = out + r * out_stride; \
    for (long kb = 0; kb < nblocks; kb++) { \
      const uchar* b = row + kb * BYTES; \
      float* ob = o + kb * QK; \
      dqb_##T(b, ob); \
    } \
  } \
} \
static void QNAME(T, gemv_m)(float* out, const float* x, const uchar* w, const long M, long k, long row_bytes, long n, long lo, long hi) { \
  float buf[QK]; \
  for (long r = lo; r < hi; r++) { \
    float lanes[QMV_ROWS][Q_LANES]; \
    for (long m = 0; m < M; m++) for (int l = 0; l < Q_LANES; l++) lanes[m][l] = 0.0f; \
    for (long kb = 0; kb < k / QK; kb++) { \
      dqb_##T(w + r * row_bytes + kb * BYTES, buf); \
      for (long m = 0; m < M; m++) { \
        const float* xs = x + m * k + kb * QK; \
        for (int j = 0; j < QK; j += Q_LANES) \
          for (int l = 0; l < Q_LANES; l++) lanes[m][l] += buf[j + l] * xs[j + l]; \
      } \
    } \
    for (long m = 0; m < M; m++) { \
      double s = 0.0; \
      for (int l = 0; l < Q_LANES; l++) s += lanes[m][l]; \
      out[m * n + r] = (float)s; \
    } \
  } \
} \
void QNAME(T, gemv)(const intptr_t* a, long lo, long hi) { \
  float* out = (float*)a[0]; \
  const float* x = (const float*)a[1]; \
  const uchar* w = (const uchar*)a[2]; \
  const long m_rows = a[3], k = a[4], row_bytes = a[5], n = a[6]; \
  /* a constant row count for the one-row case (a decode step): its sums then stay in registers */ \
  if (m_rows == 1) QNAME(T, gemv_m)(out, x, w, 1, k, row_bytes, n, lo, hi); \
  else QNAME(T, gemv_m)(out, x, w, m_rows, k, row_bytes, n, lo, hi); \
}

Q_LOOPS(q8_0, 32, 34)
Q_LOOPS(q4_0, 32, 18)
Q_LOOPS(q4_1, 32, 20)
Q_LOOPS(q5_0, 32, 22)
Q_LOOPS(q5_1, 32, 24)
Q_LOOPS(q2_k, 256, 84)
Q_LOOPS(q3_k, 256, 110)
Q_LOOPS(q4_k, 256, 144)
Q_LOOPS(q5_k, 256, 176)
Q_LOOPS(q6_k, 256, 210)
