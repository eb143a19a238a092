// Selective attention, the fused exact form on CUDA, forward and backward: the same
// algorithm as impls/cpu/selective.cpp (derivation there and in docs/selective.md), with
// the per-token arithmetic shared through impls/cuda/selective_math.hpp and the attention
// on the CUDA SDPA kernels (impls/cuda/sdpa.cu).
//
//   x: (B, T, d)  wq: (d, d)  wk = [A | B], wv = [C | D]: (d, 2d)   o: (B, T, d)
//   o_i = C q_i + Σ_{j ≤ i} softmax_j(q'_i · k'_j / √Dk) (D x_j)
//
// Kernels, in launch order (forward):
//   to_f32_kernel         x and the weights widened to dense f32
//   gemm_kernel           the five projections q = wq x, A q, B x, C q, D x (16 × 16
//                         shared-memory tiles, strided operands: one kernel serves y = x wᵀ,
//                         dx = dy w and dw = dyᵀ x)
//   augment_kernel        q' = γ [R q, u], k' = [R b, c] per (token, head, RoPE pair)
//   pad_heads_kernel      v = D x zero-padded to Dk per head (RoPE only)
//   sdpa_forward_flash    causal attention on q', k', v (saving the lse for the backward)
//   output_kernel         o = C q + the attention's first dh columns, into o's strides
// Backward: the forward recomputed up to the attention (with its lse), dO padded like v,
// sdpa_backward_flash, augment_backward_kernel (through u, RoPE: dq, d(A q), d(B x); d(D x)
// from the value gradient's first dh columns), then the projections' gradients on
// gemm_kernel and dx into its strides.
//
// Status: no GPU was available while writing this file. It compiles for sm_80/sm_90 with
// warnings as errors; its per-token arithmetic is the host-tested selective_math.hpp (the
// CPU kernel runs the same helpers) and the attention is the SDPA kernels'. The projection
// GEMMs are plain tiled kernels, not tuned (dw = dyᵀ x reduces over all B·T tokens in one
// block per 16 × 16 output tile); cuBLAS would be the next step.
#include "impls/cuda/selective.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "impls/cuda/sdpa.hpp"
#include "impls/cuda/sdpa_math.hpp"
#include "impls/cuda/selective_math.hpp"

namespace attnbench::cuda {
namespace {

namespace sm = sdpa_math;
namespace selm = selective_math;

constexpr int kThreads = 256;
constexpr int kG = 16;  // gemm tile: rows × columns × reduction step

int64_t blocks(int64_t n) { return (n + kThreads - 1) / kThreads; }

/// Device scratch, carved in 256-byte aligned regions; with a null base only counted.
struct Layout {
  int64_t dh = 0, half = 0, Dk = 0, BT = 0;
  float *X, *Wq, *Wk, *Wv;            // f32 copies: (BT, d), (d, d), (d, 2d), (d, 2d)
  float *Q, *A, *KB, *CQ, *VD;        // (BT, d): q, A q, B x, C q, D x
  float *q2 = nullptr, *k2 = nullptr, *v2 = nullptr;  // (BT, H, Dk), RoPE only
  float *o2, *lse;                    // attention output (laid out like q2, or (BT, d)), (B, H, T)
  float *dO = nullptr, *dQ = nullptr, *dA = nullptr, *dKB = nullptr, *dVD = nullptr, *dX = nullptr;
  float *do2 = nullptr, *dq2 = nullptr, *dk2 = nullptr, *dv2 = nullptr;  // (BT, H, Dk), RoPE only
  void* sdpa = nullptr;
  size_t bytes = 0;

  Layout(const SelectiveParams& p, bool backward, char* base) {
    dh = p.d / p.H, half = dh / 2, Dk = p.rope ? 2 * dh : dh, BT = p.B * p.T;
    size_t off = 0;
    auto take = [&](size_t floats) {
      off = (off + 255) & ~size_t(255);
      float* ptr = base ? reinterpret_cast<float*>(base + off) : nullptr;
      off += floats * sizeof(float);
      return ptr;
    };
    const size_t n = size_t(BT * p.d), d = size_t(p.d), aug = size_t(BT * p.H * Dk);
    X = take(n), Wq = take(d * d), Wk = take(2 * d * d), Wv = take(2 * d * d);
    Q = take(n), A = take(n), KB = take(n), CQ = take(n), VD = take(n);
    if (p.rope) q2 = take(aug), k2 = take(aug), v2 = take(aug);
    o2 = take(p.rope ? aug : n), lse = take(size_t(p.B * p.H * p.T));
    size_t sdpa_bytes = sdpa_forward_flash_scratch_bytes(attention(p));
    if (backward) {
      dO = take(n), dQ = take(n), dA = take(n), dKB = take(n), dVD = take(n), dX = take(n);
      if (p.rope) do2 = take(aug), dq2 = take(aug), dk2 = take(aug), dv2 = take(aug);
      sdpa_bytes = std::max(sdpa_bytes, sdpa_backward_flash_scratch_bytes(attention_backward(p)));
    }
    off = (off + 255) & ~size_t(255);
    sdpa = base ? base + off : nullptr;
    bytes = off + sdpa_bytes;
  }

  /// The forward attention on q', k', v (or Q, B x, D x) into o2, saving the lse.
  SdpaParams attention(const SelectiveParams& p) const {
    SdpaParams s = selm::attention_params(p);
    s.q = p.rope ? q2 : Q, s.k = p.rope ? k2 : KB, s.v = p.rope ? v2 : VD;
    s.o = o2, s.lse = lse;
    return s;
  }
  SdpaBackwardParams attention_backward(const SelectiveParams& p) const {
    SdpaBackwardParams b;
    b.fwd = attention(p);
    b.do_strides = b.dq_strides = b.dk_strides = b.dv_strides = b.fwd.q_strides;
    b.dout = p.rope ? do2 : dO;
    b.dq = p.rope ? dq2 : dQ, b.dk = p.rope ? dk2 : dKB, b.dv = p.rope ? dv2 : dVD;
    return b;
  }
};

/// dst (rows, cols) dense f32 from src in kT: row r = (r / T, r % T) at src + (r / T)·st.b
/// + (r % T)·st.t (a dense matrix is T = rows, st.t = cols).
template <DType kT>
__global__ void to_f32_kernel(float* dst, const void* src, int64_t rows, int64_t cols, int64_t T,
                              SelectiveStrides st) {
  using E = sm::Elem<kT>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const int64_t r = idx / cols, c = idx % cols;
  dst[idx] = E::to_f32(static_cast<const typename E::type*>(src)[(r / T) * st.b + (r % T) * st.t + c]);
}

/// C[m, n] (+)= Σ_k A[m·sam + k·sak] · B[k·sbk + n·sbn], C row-major with leading dimension ldc.
struct Gemm {
  int64_t M, N, K;
  const float* A;
  int64_t sam, sak;
  const float* B;
  int64_t sbk, sbn;
  float* C;
  int64_t ldc;
  bool accumulate;
};

/// One kG × kG tile of C per block (rows on grid x: B·T can exceed grid y's limit).
__global__ void __launch_bounds__(kG * kG) gemm_kernel(const Gemm g) {
  __shared__ float As[kG][kG + 1], Bs[kG][kG + 1];
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  const int64_t m0 = int64_t(blockIdx.x) * kG, n0 = int64_t(blockIdx.y) * kG;
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < g.K; k0 += kG) {
    const int64_t am = m0 + ty, ak = k0 + tx, bk = k0 + ty, bn = n0 + tx;
    As[ty][tx] = am < g.M && ak < g.K ? g.A[am * g.sam + ak * g.sak] : 0.0f;
    Bs[ty][tx] = bk < g.K && bn < g.N ? g.B[bk * g.sbk + bn * g.sbn] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kG; ++kk) acc = fmaf(As[ty][kk], Bs[kk][tx], acc);
    __syncthreads();
  }
  const int64_t m = m0 + ty, n = n0 + tx;
  if (m < g.M && n < g.N) {
    float* c = g.C + m * g.ldc + n;
    *c = g.accumulate ? *c + acc : acc;
  }
}

void gemm(const Gemm& g, cudaStream_t stream) {
  const dim3 grid(unsigned((g.M + kG - 1) / kG), unsigned((g.N + kG - 1) / kG));
  gemm_kernel<<<grid, dim3(kG, kG), 0, stream>>>(g);
}
/// y (rows, out) = x (rows, in) · wᵀ, w (out, in) with leading dimension ldw.
void linear(float* y, const float* x, const float* w, int64_t ldw, int64_t rows, int64_t out, int64_t in,
            cudaStream_t s) {
  gemm({rows, out, in, x, in, 1, w, 1, ldw, y, out, false}, s);
}
/// dx (rows, in) += dy (rows, out) · w.
void linear_dx(float* dx, const float* dy, const float* w, int64_t ldw, int64_t rows, int64_t out, int64_t in,
               bool accumulate, cudaStream_t s) {
  gemm({rows, in, out, dy, out, 1, w, ldw, 1, dx, in, accumulate}, s);
}
/// dw (out, in; leading dimension lddw) = dyᵀ (out, rows) · x (rows, in).
void linear_dw(float* dw, int64_t lddw, const float* dy, const float* x, int64_t rows, int64_t out, int64_t in,
               cudaStream_t s) {
  gemm({out, in, rows, dy, 1, out, x, in, 1, dw, lddw, false}, s);
}

/// The pair's (cos, sin) at position i (float of the double angle, as the CPU table).
__device__ __forceinline__ void rope_cs(int64_t i, int64_t t, int64_t dh, float& c, float& s) {
  double sd, cd;
  sincos(sm::rope_angle(i, int(t), int(dh)), &sd, &cd);
  c = float(cd), s = float(sd);
}

/// q2, k2 per (token, head, pair t < half).
__global__ void augment_kernel(const Layout L, int64_t T, int64_t d, int64_t H, float gamma) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= L.BT * H * L.half) return;
  const int64_t t = idx % L.half, bh = idx / L.half, h = bh % H, bt = bh / H;
  float c, s;
  rope_cs(bt % T, t, L.dh, c, s);
  const int64_t x = bt * d + h * L.dh, y = bh * L.Dk;
  selm::augment_pair(L.Q + x, L.A + x, L.KB + x, c, s, gamma, t, L.half, L.q2 + y, L.k2 + y);
}

/// dst (BT, H, Dk) = src (BT, d) per head, zero-padded from dh to Dk.
__global__ void pad_heads_kernel(float* dst, const float* src, int64_t BT, int64_t d, int64_t H, int64_t dh,
                                 int64_t Dk) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= BT * H * Dk) return;
  const int64_t e = idx % Dk, bh = idx / Dk, h = bh % H, bt = bh / H;
  dst[idx] = e < dh ? src[bt * d + h * dh + e] : 0.0f;
}

/// o (strided) = C q + the attention output's first dh columns of each head.
__global__ void output_kernel(float* o, SelectiveStrides ost, const Layout L, int64_t T, int64_t d, int64_t H,
                              bool rope) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= L.BT * d) return;
  const int64_t c = idx % d, bt = idx / d, h = c / L.dh, e = c % L.dh;
  const float att = rope ? L.o2[(bt * H + h) * L.Dk + e] : L.o2[idx];
  o[(bt / T) * ost.b + (bt % T) * ost.t + c] = L.CQ[idx] + att;
}

/// Through q' and k' back to dq, d(A q), d(B x); d(D x) from dv2's first dh columns.
__global__ void augment_backward_kernel(const Layout L, int64_t T, int64_t d, int64_t H, float gamma) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= L.BT * H * L.half) return;
  const int64_t t = idx % L.half, bh = idx / L.half, h = bh % H, bt = bh / H;
  float c, s;
  rope_cs(bt % T, t, L.dh, c, s);
  const int64_t x = bt * d + h * L.dh, y = bh * L.Dk;
  selm::augment_pair_backward(L.dq2 + y, L.dk2 + y, L.Q + x, L.A + x, c, s, gamma, t, L.half, L.dQ + x, L.dA + x,
                              L.dKB + x);
  L.dVD[x + t] = L.dv2[y + t];
  L.dVD[x + t + L.half] = L.dv2[y + t + L.half];
}

/// dst (strided) = src (BT, d) dense.
__global__ void store_rows_kernel(float* dst, SelectiveStrides st, const float* src, int64_t BT, int64_t T,
                                  int64_t d) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= BT * d) return;
  const int64_t bt = idx / d, c = idx % d;
  dst[(bt / T) * st.b + (bt % T) * st.t + c] = src[idx];
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("selective cuda: ") + what + ": " + cudaGetErrorString(e));
}

void check_params(const SelectiveParams& p) {
  if (p.B < 1 || p.T < 1 || p.H < 1 || p.d < 1 || p.d % p.H != 0 || (p.rope && (p.d / p.H) % 2 != 0))
    throw std::invalid_argument("selective cuda: need B, T, H, d >= 1, d a multiple of H, an even d_head with RoPE");
  if (p.dtype != DType::f32 && p.dtype != DType::bf16)
    throw std::invalid_argument("selective cuda: x and the weights must be f32 or bf16");
  const int64_t Dk = p.rope ? 2 * (p.d / p.H) : p.d / p.H;
  if (Dk > kSdpaMaxHeadDim)
    throw std::invalid_argument("selective cuda: the attention's head dimension " + std::to_string(Dk) +
                                " exceeds the SDPA kernel's " + std::to_string(kSdpaMaxHeadDim));
}

template <DType kT>
void widen(float* dst, const void* src, int64_t rows, int64_t cols, int64_t T, SelectiveStrides st,
           cudaStream_t s) {
  to_f32_kernel<kT><<<unsigned(blocks(rows * cols)), kThreads, 0, s>>>(dst, src, rows, cols, T, st);
}
void widen(DType dt, float* dst, const void* src, int64_t rows, int64_t cols, int64_t T, SelectiveStrides st,
           cudaStream_t s) {
  if (dt == DType::bf16)
    widen<DType::bf16>(dst, src, rows, cols, T, st, s);
  else
    widen<DType::f32>(dst, src, rows, cols, T, st, s);
}

/// Inputs widened, the projections, the augmented operands and the attention (with its
/// lse) into L.o2: what forward and backward share.
void forward_attention(const SelectiveParams& p, const Layout& L, cudaStream_t s) {
  const int64_t d = p.d, BT = L.BT;
  widen(p.dtype, L.X, p.x, BT, d, p.T, p.x_strides, s);
  widen(p.dtype, L.Wq, p.wq, d, d, d, {0, d}, s);
  widen(p.dtype, L.Wk, p.wk, d, 2 * d, d, {0, 2 * d}, s);
  widen(p.dtype, L.Wv, p.wv, d, 2 * d, d, {0, 2 * d}, s);
  linear(L.Q, L.X, L.Wq, d, BT, d, d, s);
  linear(L.KB, L.X, L.Wk + d, 2 * d, BT, d, d, s);
  linear(L.CQ, L.Q, L.Wv, 2 * d, BT, d, d, s);
  linear(L.VD, L.X, L.Wv + d, 2 * d, BT, d, d, s);
  if (p.rope) {
    linear(L.A, L.Q, L.Wk, 2 * d, BT, d, d, s);
    augment_kernel<<<unsigned(blocks(BT * p.H * L.half)), kThreads, 0, s>>>(L, p.T, d, p.H, selm::query_gamma(p));
    pad_heads_kernel<<<unsigned(blocks(BT * p.H * L.Dk)), kThreads, 0, s>>>(L.v2, L.VD, BT, d, p.H, L.dh, L.Dk);
  }
  check_launch("projections");
  sdpa_forward_flash(L.attention(p), L.sdpa, s);
}

}  // namespace

size_t selective_forward_fused_cuda_scratch_bytes(const SelectiveParams& p) {
  check_params(p);
  return Layout(p, false, nullptr).bytes;
}
size_t selective_backward_fused_cuda_scratch_bytes(const SelectiveParams& p) {
  check_params(p);
  return Layout(p, true, nullptr).bytes;
}

void selective_forward_fused_cuda(const SelectiveParams& p, void* scratch, void* stream) {
  check_params(p);
  if (!p.o) throw std::invalid_argument("selective cuda: o is missing");
  const auto s = static_cast<cudaStream_t>(stream);
  const Layout L(p, false, static_cast<char*>(scratch));
  forward_attention(p, L, s);
  output_kernel<<<unsigned(blocks(L.BT * p.d)), kThreads, 0, s>>>(p.o, p.o_strides, L, p.T, p.d, p.H, p.rope);
  check_launch("output");
}

void selective_backward_fused_cuda(const SelectiveParams& p, void* scratch, void* stream) {
  check_params(p);
  if (!p.dout || !p.dx || !p.dwq || !p.dwk || !p.dwv)
    throw std::invalid_argument("selective cuda: dout or a gradient is missing");
  const auto s = static_cast<cudaStream_t>(stream);
  const Layout L(p, true, static_cast<char*>(scratch));
  const int64_t d = p.d, BT = L.BT;
  forward_attention(p, L, s);
  widen(p.dtype, L.dO, p.dout, BT, d, p.T, p.dout_strides, s);
  if (p.rope) pad_heads_kernel<<<unsigned(blocks(BT * p.H * L.Dk)), kThreads, 0, s>>>(L.do2, L.dO, BT, d, p.H, L.dh, L.Dk);
  check_launch("cotangent");
  sdpa_backward_flash(L.attention_backward(p), L.sdpa, s);
  if (p.rope) {
    augment_backward_kernel<<<unsigned(blocks(BT * p.H * L.half)), kThreads, 0, s>>>(L, p.T, d, p.H,
                                                                                      selm::query_gamma(p));
    // a = A q: its gradient reaches q and the first half of wk.
    linear_dx(L.dQ, L.dA, L.Wk, 2 * d, BT, d, d, true, s);
    linear_dw(p.dwk, 2 * d, L.dA, L.Q, BT, d, d, s);
  } else {
    // Without RoPE the A q term is constant along a row and cancels in the softmax.
    const size_t row = size_t(d) * sizeof(float);
    if (cudaMemset2DAsync(p.dwk, 2 * row, 0, row, size_t(d), s) != cudaSuccess)
      throw std::runtime_error("selective cuda: cannot clear dwk");
  }
  // o = C q + attention(..., D x): C q's gradient reaches q and the first half of wv.
  linear_dx(L.dQ, L.dO, L.Wv, 2 * d, BT, d, d, true, s);
  linear_dw(p.dwv, 2 * d, L.dO, L.Q, BT, d, d, s);
  linear_dw(p.dwk + d, 2 * d, L.dKB, L.X, BT, d, d, s);
  linear_dw(p.dwv + d, 2 * d, L.dVD, L.X, BT, d, d, s);
  linear_dw(p.dwq, d, L.dQ, L.X, BT, d, d, s);
  linear_dx(L.dX, L.dKB, L.Wk + d, 2 * d, BT, d, d, false, s);
  linear_dx(L.dX, L.dVD, L.Wv + d, 2 * d, BT, d, d, true, s);
  linear_dx(L.dX, L.dQ, L.Wq, d, BT, d, d, true, s);
  store_rows_kernel<<<unsigned(blocks(BT * d)), kThreads, 0, s>>>(p.dx, p.dx_strides, L.dX, BT, p.T, d);
  check_launch("projection gradients");
}

}  // namespace attnbench::cuda
