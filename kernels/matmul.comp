// matmul v3 for Vulkan (GLSL 450 compute): kernels/matmul.cl's tiling, register blocking and hooks.
//   out[b, i, j] = STORE(sum_k A[b, i, k] * B[b, k, j])
//
// One workgroup computes a BM x BN tile of the output; each of its TX x TY invocations keeps a
// TM x TN block of sums in registers. Per step of BK along k, a BM x BK slice of A and a BK x BN
// slice of B are staged in shared memory, so each element read from a buffer is used TN (A) or
// TM (B) times from registers. An invocation owns rows ty, ty + TY, ... and columns tx, tx + TX,
// ... (strided, not adjacent): neighbouring invocations read neighbouring shared words and store
// neighbouring columns. Workgroups: (ceil(N / BN), ceil(M / BM), batch).
//
// What comes before this file (GLSL has no kernel parameters: buffers are declared globally):
// #version 450 and the extensions; the defines MM_M, MM_N, MM_K, BM, BN, BK, TM, TN, IDX (the
// index type); and the hooks, which the backend (minift/backends/vulkan/codegen.py) generates from
// the operands' views and the fused epilogue together with the buffer declarations:
//   A_AT(b, i, k)           A's element as a float (B_AT(b, k, j) likewise); only called in range
//   MM_STORE(acc, b, i, j)  write one result (the backend's mm_store applies the epilogue)
//   A_K_FAST, B_N_FAST      load tiles walking k (resp. n) fastest: coalesced when that is the
//                           operand's contiguous axis
// Without MM_STORE (tools/kernel_test.py --device vulkan runs it so) the defaults below declare row-major
// out, A and B in bindings 0, 1 and 2; B_HALF stores B as float16 (16-bit storage).

#ifndef IDX
#define IDX int
#endif
#ifndef MM_STORE
layout(std430, binding = 0) writeonly buffer Out { float out_[]; };
layout(std430, binding = 1) readonly buffer A { float a_[]; };
#ifdef B_HALF
layout(std430, binding = 2) readonly buffer B { float16_t b_[]; };
#else
layout(std430, binding = 2) readonly buffer B { float b_[]; };
#endif
#define A_AT(b, i, k) a_[((b) * MM_M + (i)) * MM_K + (k)]
#define B_AT(b, k, j) float(b_[((b) * MM_K + (k)) * MM_N + (j)])
#define MM_STORE(acc, b, i, j) out_[((b) * MM_M + (i)) * MM_N + (j)] = (acc)
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
layout(local_size_x = TX, local_size_y = TY, local_size_z = 1) in;

shared float As[BK][BM + 1];   // +1: writes along k do not all hit one shared-memory bank
shared float Bs[BK][BN + 1];

void main() {
  int tx = int(gl_LocalInvocationID.x), ty = int(gl_LocalInvocationID.y), tid = ty * TX + tx;
  IDX j0 = IDX(gl_WorkGroupID.x) * BN, i0 = IDX(gl_WorkGroupID.y) * BM, b = IDX(gl_WorkGroupID.z);
  float acc[TM][TN];
  for (int p = 0; p < TM; p++)
    for (int q = 0; q < TN; q++) acc[p][q] = 0.0f;

  for (IDX k0 = 0; k0 < MM_K; k0 += BK) {
    for (int l = tid; l < BM * BK; l += NTHREADS) {
#if A_K_FAST
      int kk = l % BK, ii = l / BK;
#else
      int ii = l % BM, kk = l / BM;
#endif
      IDX i = i0 + ii, k = k0 + kk;
      As[kk][ii] = (i < MM_M && k < MM_K) ? A_AT(b, i, k) : 0.0f;
    }
    for (int l = tid; l < BK * BN; l += NTHREADS) {
#if B_N_FAST
      int jj = l % BN, kk = l / BN;
#else
      int kk = l % BK, jj = l / BK;
#endif
      IDX j = j0 + jj, k = k0 + kk;
      Bs[kk][jj] = (j < MM_N && k < MM_K) ? B_AT(b, k, j) : 0.0f;
    }
    barrier();
    for (int kk = 0; kk < BK; kk++) {
      float av[TM], bv[TN];
      for (int p = 0; p < TM; p++) av[p] = As[kk][ty + p * TY];
      for (int q = 0; q < TN; q++) bv[q] = Bs[kk][tx + q * TX];
      for (int p = 0; p < TM; p++)
        for (int q = 0; q < TN; q++) acc[p][q] += av[p] * bv[q];
    }
    barrier();
  }

  for (int p = 0; p < TM; p++) {
    IDX i = i0 + ty + p * TY;
    for (int q = 0; q < TN; q++) {
      IDX j = j0 + tx + q * TX;
      if (i < MM_M && j < MM_N) MM_STORE(acc[p][q], b, i, j);
    }
  }
}
