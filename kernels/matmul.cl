// matmul v3: tiled and register-blocked.  out[b, i, j] = STORE(sum_k A[b, i, k] * B[b, k, j])
//
// One work-group computes a BM x BN tile of the output; each of its TX x TY work-items keeps a
// TM x TN block of sums in registers. Per step of BK along k, a BM x BK slice of A and a BK x BN
// slice of B are staged in local memory, so each element read from global memory is used TN
// (A) or TM (B) times from registers. A work-item owns rows ty, ty + TY, ... and columns tx,
// tx + TX, ... (strided, not adjacent): neighbouring work-items read neighbouring local words and
// store neighbouring columns.
//
// Parameters (defines): MM_M, MM_N, MM_K, MM_BATCH (work-group dim 2); BM, BN, BK, TM, TN;
// OUT_T (output storage type), IDX (index type), MM_NAME (kernel name).
// Hooks, with defaults for contiguous row-major operands (used by kernels/run.py):
//   MM_ARGS                 extra kernel parameters: the operand buffers
//   A_AT(b, i, k)           A's element as a float (B_AT(b, k, j) likewise); only called in range
//   MM_STORE(acc, b, i, j)  write one result; the backend fuses the elementwise epilogue here
//   A_K_FAST, B_N_FAST      load tiles walking k (resp. n) fastest: coalesced when that is the
//                           operand's contiguous axis
//   B_HALF                  the default B_AT reads B stored as half via vload_half (frozen weights
//                           at half the memory; no cl_khr_fp16 needed)

#ifndef IDX
#define IDX int
#endif
#ifndef MM_NAME
#define MM_NAME matmul
#endif
#ifndef OUT_T
#define OUT_T float
#endif
#ifndef MM_BATCH
#define MM_BATCH 1
#endif
#ifndef MM_ARGS
#ifdef B_HALF
#define MM_ARGS , __global const float* A, __global const half* B
#define B_AT(b, k, j) vload_half(((b) * MM_K + (k)) * MM_N + (j), B)
#else
#define MM_ARGS , __global const float* A, __global const float* B
#define B_AT(b, k, j) B[((b) * MM_K + (k)) * MM_N + (j)]
#endif
#define A_AT(b, i, k) A[((b) * MM_M + (i)) * MM_K + (k)]
#define MM_STORE(acc, b, i, j) out[((b) * MM_M + (i)) * MM_N + (j)] = (acc)
#endif
#ifndef A_K_FAST
#define A_K_FAST 1
#endif
#ifndef B_N_FAST
#define B_N_FAST 1
#endif

#define TX (BN / TN)
#define TY (BM / TM)
#define NTHREADS (TX * TY)

__kernel __attribute__((reqd_work_group_size(TX, TY, 1)))
void MM_NAME(__global OUT_T* out MM_ARGS) {
  const int tx = get_local_id(0), ty = get_local_id(1), tid = ty * TX + tx;
  const IDX j0 = (IDX)get_group_id(0) * BN, i0 = (IDX)get_group_id(1) * BM, b = get_group_id(2);
  __local float As[BK][BM + 1];   // +1: writes along k do not all hit one local-memory bank
  __local float Bs[BK][BN + 1];
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
    for (int l = tid; l < BK * BN; l += NTHREADS) {
#if B_N_FAST
      const int jj = l % BN, kk = l / BN;
#else
      const int kk = l % BK, jj = l / BK;
#endif
      const IDX j = j0 + jj, k = k0 + kk;
      Bs[kk][jj] = (j < MM_N && k < MM_K) ? B_AT(b, k, j) : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    #pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float a[TM], bv[TN];
      for (int p = 0; p < TM; p++) a[p] = As[kk][ty + p * TY];
      for (int q = 0; q < TN; q++) bv[q] = Bs[kk][tx + q * TX];
      for (int p = 0; p < TM; p++)
        for (int q = 0; q < TN; q++) acc[p][q] += a[p] * bv[q];
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
