// The register-blocked f32 GEMM (impls/cpu/gemm.hpp). A is read through its
// strides; B is packed per block of kKc k into panels of NR = kNv vectors of
// columns (zero-padded), so the micro-kernel streams one panel row per k and
// keeps kMr × kNv accumulators in registers.
#include "impls/cpu/gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifndef ATTNBENCH_IMPLS_CPU_GEMM_CONSTANTS_
#define ATTNBENCH_IMPLS_CPU_GEMM_CONSTANTS_
namespace attnbench::cpu::gemm_detail {
inline constexpr int64_t kKc = 256;    // k per packed block of B
inline constexpr int64_t kMaxNr = 48;  // widest panel (3 AVX-512 vectors); every target's NR divides it
}  // namespace attnbench::cpu::gemm_detail
#endif

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/gemm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using gemm_detail::kKc;
using gemm_detail::kMaxNr;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Register block: kMr rows × kNv vectors of accumulators.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr int kMr = 8;
inline constexpr int kNv = 3;
#else
inline constexpr int kMr = 6;
inline constexpr int kNv = 2;
#endif

/// C[rows, cols] (+)= A[rows, kc] · Bp[kc, NR] for one register block (rows ≤ kMr, cols ≤ NR).
static HWY_INLINE void Micro(int64_t kc, const GemmOperand& a, int64_t rows, const float* HWY_RESTRICT bp, float* c,
                             int64_t ldc, int64_t cols, bool acc) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d)), NR = kNv * L;
  const float* ar[kMr];
  for (int r = 0; r < kMr; ++r) ar[r] = a.p + std::min<int64_t>(r, rows - 1) * a.rs;
  VF cv[kMr][kNv];
  for (auto& row : cv)
    for (auto& v : row) v = hn::Zero(d);
  const int64_t ks = a.cs;
  for (int64_t k = 0; k < kc; ++k) {
    VF b[kNv];
    for (int v = 0; v < kNv; ++v) b[v] = hn::LoadU(d, bp + k * NR + v * L);
    for (int r = 0; r < kMr; ++r) {
      const VF av = hn::Set(d, ar[r][k * ks]);
      for (int v = 0; v < kNv; ++v) cv[r][v] = hn::MulAdd(av, b[v], cv[r][v]);
    }
  }
  if (rows == kMr && cols == NR) {
    for (int r = 0; r < kMr; ++r)
      for (int v = 0; v < kNv; ++v) {
        float* p = c + r * ldc + v * L;
        hn::StoreU(acc ? hn::Add(cv[r][v], hn::LoadU(d, p)) : cv[r][v], d, p);
      }
    return;
  }
  HWY_ALIGN float tmp[kMaxNr];
  for (int64_t r = 0; r < rows; ++r) {
    for (int v = 0; v < kNv; ++v) hn::Store(cv[r][v], d, tmp + v * L);
    float* p = c + r * ldc;
    for (int64_t j = 0; j < cols; ++j) p[j] = acc ? p[j] + tmp[j] : tmp[j];
  }
}

void GemmSerial(int64_t M, int64_t Nn, int64_t K, GemmOperand a, GemmOperand b, float* c, int64_t ldc,
                bool accumulate, float* pack) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d)), NR = kNv * L, np = (Nn + NR - 1) / NR;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + Nn, 0.0f);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t p = 0; p < np; ++p) {
      float* dst = pack + p * kc * NR;
      const int64_t j0 = p * NR, w = std::min(NR, Nn - j0);
      if (b.cs == 1) {
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = b.p + (k0 + k) * b.rs + j0;
          float* row = dst + k * NR;
          std::memcpy(row, src, size_t(w) * sizeof(float));
          for (int64_t j = w; j < NR; ++j) row[j] = 0.0f;
        }
      } else {
        for (int64_t j = 0; j < NR; ++j) {
          if (j < w) {
            const float* src = b.p + (j0 + j) * b.cs + k0 * b.rs;
            for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = src[k * b.rs];
          } else {
            for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = 0.0f;
          }
        }
      }
    }
    const bool acc = accumulate || k0 > 0;
    for (int64_t i0 = 0; i0 < M; i0 += kMr) {
      const GemmOperand ai{a.p + i0 * a.rs + k0 * a.cs, a.rs, a.cs};
      const int64_t rows = std::min<int64_t>(kMr, M - i0);
      for (int64_t p = 0; p < np; ++p)
        Micro(kc, ai, rows, pack + p * kc * NR, c + i0 * ldc + p * NR, ldc, std::min(NR, Nn - p * NR), acc);
    }
  }
}

void GemmRows(int64_t M, int64_t Nn, int64_t K, GemmOperand a, GemmOperand b, float* c, int64_t ldc, bool accumulate,
              float* packs, int64_t pack_stride, int threads) {
  const int64_t chunk = int64_t(kMr) * 48, n = (M + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < n; ++t) {
    const int64_t i0 = t * chunk;
    const GemmOperand ai{a.p + i0 * a.rs, a.rs, a.cs};
    GemmSerial(std::min(chunk, M - i0), Nn, K, ai, b, c + i0 * ldc, ldc, accumulate,
               packs + omp_get_thread_num() * pack_stride);
  }
}

void GemmReduce(int64_t M, int64_t Nn, int64_t K, GemmOperand a, GemmOperand b, float* c, int64_t ldc,
                float* partials, float* packs, int64_t pack_stride, int threads) {
  const int64_t MN = M * Nn;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t k0 = K * t / nt, k1 = K * (t + 1) / nt;
    const GemmOperand at{a.p + k0 * a.cs, a.rs, a.cs};
    const GemmOperand bt{b.p + k0 * b.rs, b.rs, b.cs};
    GemmSerial(M, Nn, k1 - k0, at, bt, partials + t * MN, Nn, false, packs + t * pack_stride);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < MN; ++i) {
      float s = 0;
      for (int u = 0; u < nt; ++u) s += partials[u * MN + i];
      c[(i / Nn) * ldc + i % Nn] = s;
    }
  }
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench::cpu {

HWY_EXPORT(GemmSerial);
HWY_EXPORT(GemmRows);
HWY_EXPORT(GemmReduce);

int64_t gemm_pack_floats(int64_t N) {
  using gemm_detail::kKc, gemm_detail::kMaxNr;
  return kKc * ((std::max<int64_t>(N, 1) + kMaxNr - 1) / kMaxNr * kMaxNr);
}

void gemm_serial(int64_t M, int64_t N, int64_t K, GemmOperand A, GemmOperand B, float* C, int64_t ldc,
                 bool accumulate, float* pack) {
  HWY_DYNAMIC_DISPATCH(GemmSerial)(M, N, K, A, B, C, ldc, accumulate, pack);
}

void gemm_rows(int64_t M, int64_t N, int64_t K, GemmOperand A, GemmOperand B, float* C, int64_t ldc, bool accumulate,
               float* packs, int64_t pack_stride, int threads) {
  HWY_DYNAMIC_DISPATCH(GemmRows)(M, N, K, A, B, C, ldc, accumulate, packs, pack_stride, threads);
}

void gemm_reduce(int64_t M, int64_t N, int64_t K, GemmOperand A, GemmOperand B, float* C, int64_t ldc,
                 float* partials, float* packs, int64_t pack_stride, int threads) {
  HWY_DYNAMIC_DISPATCH(GemmReduce)(M, N, K, A, B, C, ldc, partials, packs, pack_stride, threads);
}

}  // namespace attnbench::cpu
#endif  // HWY_ONCE
