// matmul v2: square tiles in local memory, one output per work-item.
// A TS x TS work-group stages a TS x TS tile of A and of B per step along k, so each global
// element is read once per tile instead of once per output (TS times fewer global reads than v1).
// Still one multiply-add per two local-memory reads: v3 (matmul.cl) adds register blocking.
// out = A (M x K) @ B (K x N), row-major. Parameters (defines): MM_M, MM_N, MM_K, TS.

__kernel __attribute__((reqd_work_group_size(TS, TS, 1)))
void matmul_v2(__global float* out, __global const float* A, __global const float* B) {
  const int tj = get_local_id(0), ti = get_local_id(1);
  const int j = get_group_id(0) * TS + tj, i = get_group_id(1) * TS + ti;
  __local float As[TS][TS], Bs[TS][TS];
  float acc = 0.0f;
  for (int k0 = 0; k0 < MM_K; k0 += TS) {
    As[ti][tj] = (i < MM_M && k0 + tj < MM_K) ? A[i * MM_K + k0 + tj] : 0.0f;
    Bs[ti][tj] = (k0 + ti < MM_K && j < MM_N) ? B[(k0 + ti) * MM_N + j] : 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int kk = 0; kk < TS; kk++) acc += As[ti][kk] * Bs[kk][tj];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (i < MM_M && j < MM_N) out[i * MM_N + j] = acc;
}
