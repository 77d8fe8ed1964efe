// matmul v5/v6: weights in an image2d.  out[i, j] = STORE(sum_k A[i, k] * W[j, k])
//
// For x @ W.T with W stored (N, K) row-major, as torch stores a linear layer's weight. W lives
// in an image2d of height N and width K/4: pixel (k4, j) holds W[j, 4*k4 .. 4*k4 + 3] as RGBA,
// with float (v5) or half (v6) channels; read_imagef returns float4 either way, so half weights
// need no cl_khr_fp16. Reads go through the texture cache (Adreno's fast path for read-only
// data) and need no bounds checks: CLK_ADDRESS_CLAMP returns 0 outside the image.
// A is staged in local memory as in matmul.cl; W is not staged.
//
// Parameters as in matmul.cl: MM_M, MM_N, MM_K (a multiple of 4); BM, BN, BK (a multiple of 4),
// TM, TN; OUT_T, IDX, MM_NAME; hooks MM_ARGS, A_AT(b, i, k), MM_STORE(acc, b, i, j), A_K_FAST.

#ifndef IDX
#define IDX int
#endif
#ifndef MM_NAME
#define MM_NAME matmul_image
#endif
#ifndef OUT_T
#define OUT_T float
#endif
#ifndef MM_ARGS
#define MM_ARGS , __global const float* A
#define A_AT(b, i, k) A[(i) * MM_K + (k)]
#define MM_STORE(acc, b, i, j) out[(i) * MM_N + (j)] = (acc)
#endif
#ifndef A_K_FAST
#define A_K_FAST 1
#endif

#define TX (BN / TN)
#define TY (BM / TM)
#define NTHREADS (TX * TY)

__kernel __attribute__((reqd_work_group_size(TX, TY, 1)))
void MM_NAME(__global OUT_T* out MM_ARGS, __read_only image2d_t W) {
  const sampler_t smp = CLK_NORMALIZED_COORDS_FALSE | CLK_ADDRESS_CLAMP | CLK_FILTER_NEAREST;
  const int tx = get_local_id(0), ty = get_local_id(1), tid = ty * TX + tx;
  const IDX j0 = (IDX)get_group_id(0) * BN, i0 = (IDX)get_group_id(1) * BM, b = 0;
  __local float As[BK][BM + 1];
  float acc[TM][TN];
  for (int p = 0; p < TM; p++)
    for (int q = 0; q < TN; q++) acc[p][q] = 0.0f;

  for (IDX k0 = 0; k0 < MM_K; k0 += BK) {
    for (int l = tid; l < BM * BK; l += NTHREADS) {
#if A_K_FAST
      const int kk = l % BK, ii = l / BK;
#else
      const int ii = l % BM, kk = l / BM;
#endif
      const IDX i = i0 + ii, k = k0 + kk;
      As[kk][ii] = (i < MM_M && k < MM_K) ? A_AT(b, i, k) : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k4 = 0; k4 < BK / 4; k4++) {
      float4 w[TN];
      for (int q = 0; q < TN; q++) w[q] = read_imagef(W, smp, (int2)((int)(k0 / 4) + k4, (int)j0 + tx + q * TX));
      for (int p = 0; p < TM; p++) {
        const int ii = ty + p * TY;
        const float4 a = (float4)(As[4 * k4][ii], As[4 * k4 + 1][ii], As[4 * k4 + 2][ii], As[4 * k4 + 3][ii]);
        for (int q = 0; q < TN; q++) acc[p][q] += dot(a, w[q]);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }

  for (int p = 0; p < TM; p++) {
    const IDX i = i0 + ty + p * TY;
    for (int q = 0; q < TN; q++) {
      const IDX j = j0 + tx + q * TX;
      if (i < MM_M && j < MM_N) MM_STORE(acc[p][q], b, i, j);
    }
  }
}
