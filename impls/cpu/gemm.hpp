// The CPU kernels' one register-blocked f32 GEMM, C = A·B on strided operands
// (a transposed A or B costs nothing but a strided read; B is packed into panels
// of NR columns per block of 256 k). Highway-dispatched at run time: 8 × 48
// register blocks on AVX-512, 6 × 2 vectors elsewhere. Used by the triangle
// multiplicative update (its N × N × N products and projections) and by
// selective attention's projections.
#pragma once

#include <cstdint>

namespace attnbench::cpu {

/// A strided matrix operand: element (r, c) at p[r·rs + c·cs].
struct GemmOperand {
  const float* p;
  int64_t rs, cs;
};

/// Floats of packing scratch one thread needs for a product with N columns.
int64_t gemm_pack_floats(int64_t N);

/// C (M × N, row stride ldc) = A (M × K) · B (K × N), or += when `accumulate`, on the
/// calling thread; `pack` holds gemm_pack_floats(N) floats.
void gemm_serial(int64_t M, int64_t N, int64_t K, GemmOperand A, GemmOperand B, float* C, int64_t ldc,
                 bool accumulate, float* pack);

/// The same, OpenMP over chunks of rows of C (for a long M and a small B, which each
/// chunk packs again). Thread t packs into packs + t·pack_stride (pack_stride ≥
/// gemm_pack_floats(N)).
void gemm_rows(int64_t M, int64_t N, int64_t K, GemmOperand A, GemmOperand B, float* C, int64_t ldc, bool accumulate,
               float* packs, int64_t pack_stride, int threads);

/// C (M × N, row stride ldc) = A · B for a long K (a sum over many rows, e.g. a
/// weight gradient): K split over the threads, each summing its range into
/// partials + t·M·N, then the partials added in a fixed order (deterministic for a
/// given thread count). Packs as gemm_rows.
void gemm_reduce(int64_t M, int64_t N, int64_t K, GemmOperand A, GemmOperand B, float* C, int64_t ldc,
                 float* partials, float* packs, int64_t pack_stride, int threads);

}  // namespace attnbench::cpu
