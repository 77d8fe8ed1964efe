// dequant.h: GGUF's quantized block formats, element by element, in C that both the NumPy
// backend's C loops (kernels/qmatmul.c) and the OpenCL kernels (backends/opencl/codegen.py) compile.
//
// For each type T: dq_T_at(block, j), element j of one block, and dq_T(data, i), element i of a
// buffer of whole blocks (a weight of rows that are whole blocks: any element, any view, by its
// flat index). The arithmetic is gguf.quants.dequantize's, operation for operation, in float:
// every product and sum rounds on its own (no FMA: the C loops build with -ffp-contract=off, and
// each helper here turns OpenCL's contraction off), so the values are bit for bit the reference's.
// Byte layouts, by block (ggml's; fp16 scales little-endian):
//   q8_0  32 values  34 B: d, int8 q[32]                                   x = q * d
//   q4_0  32         18 B: d, q[16] (low nibbles: 0..15, high: 16..31)     x = d * (q - 8)
//   q4_1  32         20 B: d, m, q[16]                                     x = d * q + m
//   q5_0  32         22 B: d, qh (u32: bit j is q's 5th bit), q[16]        x = d * (q - 16)
//   q5_1  32         24 B: d, m, qh, q[16]                                 x = d * q + m
//   q2_k  256        84 B: scales[16] (4-bit scale, 4-bit min), q[64] (2 bits), d, dmin
//   q3_k  256       110 B: hmask[32], q[64] (2 bits), scales[12] (6-bit, packed), d
//   q4_k  256       144 B: d, dmin, scales[12] (8 x 6-bit scale and min), q[128] (4 bits)
//   q5_k  256       176 B: d, dmin, scales[12], qh[32], q[128]
//   q6_k  256       210 B: ql[128], qh[64], int8 scales[16], d
//
// The includer defines QGLOBAL (the address space of the data, `__global` in OpenCL, empty in C),
// QFN (`static inline ` in C), QINDEX (the flat-index type) and Q_AS_FLOAT(u) (a uint's bits as a
// float: as_float in OpenCL, a union in C), and QNOCONTRACT (`#pragma OPENCL FP_CONTRACT OFF` in
// OpenCL, nothing in C), and typedefs uchar, uint.

#define QPTR QGLOBAL const uchar*

// an fp16 (2 bytes, little-endian) as a float, exactly (subnormals, signed zeros, inf and NaN too);
// by the CPU's own conversion where the includer defines Q_HALF_BITS (exact too, for every finite half)
QFN float q_half(QPTR p) {
  uint h = (uint)p[0] | ((uint)p[1] << 8);
#ifdef Q_HALF_BITS
  return Q_HALF_BITS(h);
#else
  uint e = (h >> 10) & 31u, m = h & 1023u;
  if (e == 0u) {   // zero or subnormal: m * 2^-24, exact in float
    float f = (float)m * 5.9604644775390625e-8f;
    return (h & 0x8000u) ? -f : f;
  }
  return Q_AS_FLOAT(((h & 0x8000u) << 16) | ((e == 31u ? 255u : e + 112u) << 23) | (m << 13));
#endif
}

QFN float dq_q8_0_at(QPTR b, int j) { QNOCONTRACT return (float)(signed char)b[2 + j] * q_half(b); }

QFN float dq_q4_0_at(QPTR b, int j) {
  QNOCONTRACT
  int q = (b[2 + (j & 15)] >> ((j >> 4) << 2)) & 15;
  return q_half(b) * (float)(q - 8);
}

QFN float dq_q4_1_at(QPTR b, int j) {
  QNOCONTRACT
  int q = (b[4 + (j & 15)] >> ((j >> 4) << 2)) & 15;
  float t = q_half(b) * (float)q;
  return t + q_half(b + 2);
}

QFN int q5_high(QPTR qh, int j) { return (qh[j >> 3] >> (j & 7)) & 1; }   // bit j of a little-endian u32

QFN float dq_q5_0_at(QPTR b, int j) {
  QNOCONTRACT
  int q = ((b[6 + (j & 15)] >> ((j >> 4) << 2)) & 15) | (q5_high(b + 2, j) << 4);
  return q_half(b) * (float)(q - 16);
}

QFN float dq_q5_1_at(QPTR b, int j) {
  QNOCONTRACT
  int q = ((b[8 + (j & 15)] >> ((j >> 4) << 2)) & 15) | (q5_high(b + 4, j) << 4);
  float t = q_half(b) * (float)q;
  return t + q_half(b + 2);
}

// 2 bits of q[64]: byte 32 * (j / 128) + j % 32, bit pair (j / 32) % 4 (q2_k's and q3_k's low bits)
QFN int k_2bits(QPTR q, int j) { return (q[((j >> 7) << 5) + (j & 31)] >> (((j >> 5) & 3) << 1)) & 3; }

QFN float dq_q2_k_at(QPTR b, int j) {
  QNOCONTRACT
  int sc = b[j >> 4];
  float dl = q_half(b + 80) * (float)(sc & 15);
  float ml = q_half(b + 82) * (float)(sc >> 4);
  float t = dl * (float)k_2bits(b + 16, j);
  return t - ml;
}

QFN float dq_q3_k_at(QPTR b, int j) {
  QNOCONTRACT
  QPTR scales = b + 96;
  int g = j >> 4;
  int lo = g < 8 ? (scales[g] & 15) : (scales[g - 8] >> 4);
  int hi = (scales[8 + (g & 3)] >> ((g >> 2) << 1)) & 3;
  float dl = q_half(b + 108) * (float)((lo | (hi << 4)) - 32);
  int high = ((b[j & 31] >> (j >> 5)) & 1) ^ 1;   // a set hmask bit means no offset
  return dl * (float)(k_2bits(b + 32, j) - (high << 2));
}

// q4_k's and q5_k's 6-bit scale and min of sub-block s (of 32 values)
QFN int k_scale(QPTR sc, int s) { return s < 4 ? (sc[s] & 63) : ((sc[s + 4] & 15) | ((sc[s - 4] >> 2) & 0x30)); }
QFN int k_min(QPTR sc, int s) { return s < 4 ? (sc[s + 4] & 63) : ((sc[s + 4] >> 4) | ((sc[s] >> 2) & 0x30)); }
// 4 bits of q[128]: byte 32 * (j / 64) + j % 32, low nibble for (j / 32) even
QFN int k_4bits(QPTR q, int j) { return (q[((j >> 6) << 5) + (j & 31)] >> (((j >> 5) & 1) << 2)) & 15; }

QFN float dq_q4_k_at(QPTR b, int j) {
  QNOCONTRACT
  int s = j >> 5;
  float d = q_half(b) * (float)k_scale(b + 4, s);
  float m = q_half(b + 2) * (float)k_min(b + 4, s);
  float t = d * (float)k_4bits(b + 16, j);
  return t - m;
}

QFN float dq_q5_k_at(QPTR b, int j) {
  QNOCONTRACT
  int s = j >> 5;
  float d = q_half(b) * (float)k_scale(b + 4, s);
  float m = q_half(b + 2) * (float)k_min(b + 4, s);
  int q = k_4bits(b + 48, j) | (((b[16 + (j & 31)] >> s) & 1) << 4);
  float t = d * (float)q;
  return t - m;
}

QFN float dq_q6_k_at(QPTR b, int j) {
  QNOCONTRACT
  int r = j & 127, h = j >> 7;
  int lo = (b[(h << 6) + (r & 63)] >> ((r >> 6) << 2)) & 15;
  int hi = (b[128 + (h << 5) + (r & 31)] >> ((r >> 5) << 1)) & 3;
  float d = q_half(b + 208) * (float)(signed char)b[192 + (j >> 4)];
  return d * (float)((lo | (hi << 4)) - 32);
}

// element i of a buffer of whole blocks
#define Q_FLAT(T, QK, BYTES) QFN float dq_##T(QPTR data, QINDEX i) { return dq_##T##_at(data + (i / QK) * BYTES, (int)(i % QK)); }
Q_FLAT(q8_0, 32, 34)
Q_FLAT(q4_0, 32, 18)
Q_FLAT(q4_1, 32, 20)
Q_FLAT(q5_0, 32, 22)
Q_FLAT(q5_1, 32, 24)
Q_FLAT(q2_k, 256, 84)
Q_FLAT(q3_k, 256, 110)
Q_FLAT(q4_k, 256, 144)
Q_FLAT(q5_k, 256, 176)
Q_FLAT(q6_k, 256, 210)
