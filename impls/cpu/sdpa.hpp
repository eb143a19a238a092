// Scaled-dot-product attention forward and backward: the parameters shared by
// the CPU and CUDA entry points, and the fused CPU kernels (impls/cpu/sdpa.cpp
// has the equations, the algorithms and the measured strategies;
// impls/cuda/sdpa.hpp declares the CUDA launchers with the same parameters).
// Raw pointers with strides and caller-owned scratch: no harness types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "harness/dtype.hpp"

namespace attnbench {

/// RoPE convention: none, half-split pairs (i, i + D/2), or interleaved pairs (2i, 2i + 1).
enum class SdpaRope : uint8_t { none, half, interleaved };

/// Element strides of a (B, heads, rows, cols) tensor; cols are contiguous.
struct SdpaStrides {
  int64_t b = 0, h = 0, n = 0;
};

/// Dense strides of a contiguous (B, heads, rows, cols) tensor.
inline SdpaStrides sdpa_dense_strides(int64_t heads, int64_t rows, int64_t cols) {
  return {heads * rows * cols, rows * cols, cols};
}

/// One forward call. Pointers are host pointers for the CPU entry point and
/// device pointers for the CUDA one.
struct SdpaParams {
  int64_t B = 1, H = 1, Hkv = 1, Nq = 1, Nkv = 1, D = 1;  // H a multiple of Hkv; D even with RoPE
  int64_t Dv = 0;  // head dimension of v, o and dout when it differs from q's and k's D; 0 = D (CPU only)
  bool causal = false;                                    // bottom-right aligned: j ≤ i + Nkv − Nq
  SdpaRope rope = SdpaRope::none;                         // query i at position i + Nkv − Nq, key j at j
  DType dtype = DType::f32;                               // of q, k, v (f32, bf16, f16)

  float* o = nullptr;  // (B, H, Nq, Dv) f32
  SdpaStrides o_strides;
  float* weights = nullptr;  // (B, H, Nq, Nkv) f32 probabilities, or null (need_weights off)
  SdpaStrides w_strides;
  const void* q = nullptr;  // (B, H, Nq, D) in dtype
  SdpaStrides q_strides;
  const void* k = nullptr;  // (B, Hkv, Nkv, D) in dtype
  SdpaStrides k_strides;
  const void* v = nullptr;  // (B, Hkv, Nkv, Dv) in dtype
  SdpaStrides v_strides;
  const int32_t* kv_len = nullptr;  // (B,) keys j ≥ kv_len[b] are masked; null = all Nkv keys
  float* lse = nullptr;  // (B, H, Nq) f32 dense: natural-log log-sum-exp of each row's scaled, masked scores
                         // (−inf for a row without keys); written by the forward when set, read by the backward
};

/// One backward call: the gradients of Σ ⟨dout, o⟩ with respect to q, k and v.
struct SdpaBackwardParams {
  SdpaParams fwd;                                      // shapes, q, k, v, kv_len, o (read), lse (read)
  const void* dout = nullptr;
  SdpaStrides do_strides;                               // (B, H, Nq, Dv) in fwd.dtype
  float* dq = nullptr;  SdpaStrides dq_strides;         // (B, H, Nq, D) f32
  float* dk = nullptr;  SdpaStrides dk_strides;         // (B, Hkv, Nkv, D) f32
  float* dv = nullptr;
  SdpaStrides dv_strides;  // (B, Hkv, Nkv, Dv) f32
};

/// The head dimension of v, o and dout: p.Dv, or D when it is 0.
inline int64_t sdpa_value_dim(const SdpaParams& p) { return p.Dv > 0 ? p.Dv : p.D; }

namespace cpu {

/// Bytes of scratch sdpa_forward_fused needs with `threads` OpenMP threads:
/// packed K and V (f32, B·Hkv·Nkv·D each, padded to tiles), the RoPE table and
/// one query tile, score tile and accumulator per thread.
size_t sdpa_forward_fused_scratch_bytes(const SdpaParams& p, int threads);

/// o = softmax(RoPE(q)·RoPE(k)ᵀ/√D + mask)·v with f32 accumulation and f32
/// output, the probabilities into p.weights and the rows' log-sum-exp into p.lse
/// when set. q, k, v: f32, bf16 or f16 (widened to f32 as read). Runs on `threads` OpenMP threads; `scratch`
/// (64-byte aligned) holds sdpa_forward_fused_scratch_bytes(p, threads) bytes,
/// e.g. from a Workspace.
void sdpa_forward_fused(const SdpaParams& p, void* scratch, int threads);

/// The CPU path sdpa_forward_fused takes for p now (impls/cpu/cpu_features.hpp):
/// "amx-bf16" (bf16 inputs: Q·Kᵀ and P·V on AMX tiles), "avx512bf16" (Q·Kᵀ on
/// VDPBF16PS, P·V in f32), else the f32 path's name ("avx512-f32", "AVX2", …).
/// The bf16 paths serve bf16 inputs without RoPE or weights; they round nothing
/// but the inputs (S is scaled after the product; P·V splits P into three bf16
/// parts, exact to f32 rounding), so the f32 check bound applies unchanged.
std::string sdpa_forward_path(const SdpaParams& p);

/// Bytes of scratch sdpa_backward_fused needs with `threads` threads: the
/// packed query side (rotated q, dO, both transposed, row statistics: 4 × the
/// size of q in f32), the dq accumulators (1–8 × q, more when B·Hkv is small
/// against the threads), the RoPE table and one key tile and pair tile per thread.
size_t sdpa_backward_fused_scratch_bytes(const SdpaBackwardParams& p, int threads);

/// dq, dk, dv (f32, overwritten) = the gradients of Σ ⟨dout, o⟩ with respect to
/// q, k, v, from the forward's o and lse (p.fwd.o, p.fwd.lse as
/// sdpa_forward_fused wrote them with p.fwd.lse set): FlashAttention-2's
/// algorithm, f32 accumulation; rows without keys get zero gradients. Same
/// semantics as the forward (GQA: dk, dv summed over the query heads of a kv
/// head; causal; padding; RoPE). Throws std::invalid_argument when o, lse,
/// dout or a gradient is missing.
void sdpa_backward_fused(const SdpaBackwardParams& p, void* scratch, int threads);

}  // namespace cpu
}  // namespace attnbench
