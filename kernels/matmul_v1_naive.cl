// matmul v1: naive. One work-item per output, k walked in global memory.
// The reference the tiled versions are measured against. out = A (M x K) @ B (K x N), row-major.
// Parameters (defines): MM_M, MM_N, MM_K.

__kernel void matmul_v1(__global float* out, __global const float* A, __global const float* B) {
  const int j = get_global_id(0), i = get_global_id(1);
  if (i >= MM_M || j >= MM_N) return;
  float acc = 0.0f;
  for (int k = 0; k < MM_K; k++) acc += A[i * MM_K + k] * B[k * MM_N + j];
  out[i * MM_N + j] = acc;
}
