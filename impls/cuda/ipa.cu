// Invariant Point Attention, fused CUDA forward (AlphaFold2 Alg. 22, OpenFold monomer).
//
//   s (N, c_s), z (N, N, c_z) f32 or bf16, frames (R (N, 3, 3), t (N, 3)), mask (N)  →  out (N, c_s)
//   logit_ij^h = α q_i·k_j + β b_ij^h − ½ γ_h Σ_p ‖T_i q_ip − T_j k_jp‖² + inf · m_i (m_j − 1)
//   o_i = Σ_j a_ij v_j,  o_pt_i = T_i⁻¹ Σ_j a_ij T_j v_jp,  o_pair_i = Σ_j a_ij z_ij
//   out = linear_out(concat[o, o_pt x|y|z, sqrt(‖o_pt‖² + 1e-8), o_pair])
// Same semantics and per-pair arithmetic (impls/cuda/ipa_math.hpp) as the CPU kernel; points
// are taken relative to the centroid of the translations (an exact global translation).
//
// Kernels, in launch order:
//   ipa_linear_kernel          the five nn.Linear layers: 16×16 shared-memory tiled GEMM
//                              (tiled_linear.cuh, shared with triangle.cu)
//   ipa_centroid_kernel        centroid of the translations, f64, one block
//   ipa_pack_kernel            per (residue, head): α q, frames applied to the points, values
//   ipa_prepare_weights_kernel β W_b, β b_b, γ_h
//   ipa_attend_kernel          one block per query residue i, streaming over tiles of 32 keys:
//                              the z tile is staged in shared memory (bf16 widened), one warp per
//                              head computes the tile's logits (bias from the staged z) and the
//                              online-softmax update with warp shuffles, then all threads
//                              accumulate values and the pair output Σ_j a_ij z_ij from shared
//                              memory. z is read from global memory once; nothing O(N²) is stored.
//
// Strategies (no GPU was available while writing this file: it is built for sm_80/sm_90 with
// warnings as errors and its per-pair arithmetic is the host-tested ipa_math.hpp; timings are
// to be measured with `attnbench run suites/ipa.json --impl cuda`):
//   | strategy                                              | status                         |
//   |-------------------------------------------------------|--------------------------------|
//   | materialized logits (like the reference)              | not written: O(N²·H) memory    |
//   | one block per query row, z tile in smem, warp/head    | this file                      |
//   | several query rows per block (reuse K/V tiles)        | next step: K/V come from L2 now|
#include "impls/cuda/ipa.hpp"

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "impls/cuda/ipa_math.hpp"
#include "impls/cuda/tiled_linear.cuh"
#include "impls/cuda/warp_reduce.cuh"

namespace attnbench::cuda {
namespace {

struct AttendTraits {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTile = 32;  // keys per tile: one per lane of the warp that owns a head
  static_assert(kThreads % 32 == 0, "whole warps");
};

/// Float offsets of the scratch regions (each a multiple of 4 floats, 16-byte aligned).
struct DeviceLayout {
  int64_t raw_ld, F, Wv;
  int64_t cen, raw, q, qp, k, kp, v, wb, bb, gamma, tc, total;
  explicit DeviceLayout(const ipa::IpaShape& d) {
    const int64_t H = d.H;
    F = d.concat_dim();
    Wv = d.value_dim();
    raw_ld = 3 * H * d.c + 3 * H * d.P + 3 * H * (d.P + d.Pv);
    if (raw_ld < F) raw_ld = F;
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += (n + 3) / 4 * 4;
      return o;
    };
    cen = take(8);                    // 3 doubles
    raw = take(d.N * raw_ld);         // projections, then the concatenation (N, F)
    q = take(d.N * H * d.c);          // α q          (N, H, c)
    qp = take(d.N * H * 3 * d.P);     // query points (N, H, P, 3)
    k = take(d.N * H * d.c);          // keys         (N, H, c)
    kp = take(d.N * H * 3 * d.P);     // key points   (N, H, P, 3)
    v = take(d.N * H * Wv);           // values       (N, H, c + 3 P_v)
    wb = take(H * d.c_z);             // β W_b        (H, c_z)
    bb = take(H);                     // β b_b
    gamma = take(H);                  // γ_h
    tc = take(d.N * 3);               // t_i − centroid
    total = at;
  }
};

/// Shared memory of ipa_attend_kernel, in floats.
struct AttendSmem {
  int64_t czs, zs, wb, qs, qp, p, accv, accp, m, l, sc, total;
  explicit AttendSmem(const ipa::IpaShape& d) {
    const int64_t H = d.H, T = AttendTraits::kTile;
    czs = d.c_z | 1;  // odd row stride: lanes reading zs[lane][k] hit distinct banks
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += n;
      return o;
    };
    zs = take(T * czs);
    wb = take(H * d.c_z);
    qs = take(H * d.c);
    qp = take(H * 3 * d.P);
    p = take(H * T);
    accv = take(H * d.value_dim());
    accp = take(H * d.c_z);
    m = take(H);
    l = take(H);
    sc = take(H);
    total = at;
  }
};

struct AttendParams {
  ipa::IpaShape d;
  AttendSmem sm;
  const void* z;        // (N, N, c_z) f32 or bf16
  const float* mask;    // (N)
  const float* rot;     // (N, 3, 3)
  const float* q;       // (N, H, c) α-scaled
  const float* qp;      // (N, H, P, 3)
  const float* k;       // (N, H, c)
  const float* kp;      // (N, H, P, 3)
  const float* v;       // (N, H, c + 3 P_v)
  const float* wb;      // (H, c_z) β-scaled
  const float* bb;      // (H)
  const float* gamma;   // (H) γ_h
  const float* tc;      // (N, 3)
  float* feat;          // (N, F)
};

__device__ __forceinline__ float load_z(const float* z, int64_t i) { return z[i]; }
__device__ __forceinline__ float load_z(const uint16_t* z, int64_t i) { return __uint_as_float(uint32_t(z[i]) << 16); }

/// y (rows, outs; stride ldy) = x (rows, in; stride ldx) · wᵀ + b, w (outs, in); output tiles
/// on grid x, row tiles on grid y (tiled_linear.cuh).
__global__ void ipa_linear_kernel(const float* __restrict__ x, int64_t ldx, int64_t rows, int64_t in,
                                  const float* __restrict__ w, const float* __restrict__ b, int64_t outs,
                                  float* __restrict__ y, int64_t ldy) {
  constexpr int T = tiled_linear::kTile;
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  const int64_t r = int64_t(blockIdx.y) * T + ty;
  const int64_t o0 = int64_t(blockIdx.x) * T;
  const float acc = tiled_linear::tile_dot(x, ldx, rows, in, w, outs, r, o0, tx, ty);
  if (r < rows && o0 + tx < outs) y[r * ldy + o0 + tx] = acc + b[o0 + tx];
}

/// cen[0..3) = mean of the translations, in f64.
__global__ void ipa_centroid_kernel(const float* __restrict__ t, int64_t N, double* __restrict__ cen) {
  __shared__ double part[3][256];
  const int tid = int(threadIdx.x);
  double s[3] = {0, 0, 0};
  for (int64_t i = tid; i < N; i += blockDim.x)
    for (int a = 0; a < 3; ++a) s[a] += double(t[i * 3 + a]);
  for (int a = 0; a < 3; ++a) part[a][tid] = s[a];
  __syncthreads();
  for (int half = int(blockDim.x) / 2; half > 0; half /= 2) {
    if (tid < half)
      for (int a = 0; a < 3; ++a) part[a][tid] += part[a][tid + half];
    __syncthreads();
  }
  if (tid < 3) cen[tid] = part[tid][0] / double(N > 0 ? N : 1);
}

/// Per (residue i, head h): α q, keys, values and the points in the (centred) global frame.
/// raw row i = [q (H·c) | kv (H·2c) | q points x|y|z (3·H·P) | kv points x|y|z (3·H·(P+P_v))].
__global__ void ipa_pack_kernel(ipa::IpaShape d, int64_t raw_ld, const float* __restrict__ raw,
                                const float* __restrict__ rot, const float* __restrict__ trans,
                                const double* __restrict__ cen, float* __restrict__ q, float* __restrict__ qp,
                                float* __restrict__ k, float* __restrict__ kp, float* __restrict__ v,
                                float* __restrict__ tc) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= d.N * d.H) return;
  const int64_t i = idx / d.H, h = idx % d.H;
  const int64_t H = d.H, c = d.c, P = d.P, PP = d.P + d.Pv, Wv = d.value_dim();
  const float* r = raw + i * raw_ld;
  const int64_t o_kv = H * c, o_qp = 3 * H * c, o_kvp = 3 * H * c + 3 * H * P;
  float t[3];
  for (int a = 0; a < 3; ++a) t[a] = float(double(trans[i * 3 + a]) - cen[a]);
  if (h == 0)
    for (int a = 0; a < 3; ++a) tc[i * 3 + a] = t[a];
  const float* R = rot + i * 9;
  const float alpha = rsqrtf(3.0f * float(c));
  float* vrow = v + (i * H + h) * Wv;
  for (int64_t e = 0; e < c; ++e) {
    q[(i * H + h) * c + e] = alpha * r[h * c + e];
    k[(i * H + h) * c + e] = r[o_kv + h * 2 * c + e];
    vrow[e] = r[o_kv + h * 2 * c + c + e];
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t n = h * P + p;
    const float loc[3] = {r[o_qp + n], r[o_qp + H * P + n], r[o_qp + 2 * H * P + n]};
    ipa::frame_apply(R, t, loc, qp + ((i * H + h) * P + p) * 3);
  }
  for (int64_t p = 0; p < PP; ++p) {
    const int64_t n = h * PP + p;
    const float loc[3] = {r[o_kvp + n], r[o_kvp + H * PP + n], r[o_kvp + 2 * H * PP + n]};
    float* dst = p < P ? kp + ((i * H + h) * P + p) * 3 : vrow + c + 3 * (p - P);
    ipa::frame_apply(R, t, loc, dst);
  }
}

__global__ void ipa_prepare_weights_kernel(ipa::IpaShape d, const float* __restrict__ wb_in,
                                           const float* __restrict__ bb_in, const float* __restrict__ head_weights,
                                           float* __restrict__ wb, float* __restrict__ bb, float* __restrict__ gamma) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const float beta = rsqrtf(3.0f);
  if (idx < d.H * d.c_z) wb[idx] = beta * wb_in[idx];
  if (idx < d.H) {
    bb[idx] = beta * bb_in[idx];
    gamma[idx] = ipa::point_weight(head_weights[idx], d.P);
  }
}

/// One block per query residue i; see the file comment.
template <class ZT>
__global__ void __launch_bounds__(AttendTraits::kThreads) ipa_attend_kernel(AttendParams a) {
  extern __shared__ float smem[];
  constexpr int T = AttendTraits::kTile;
  const ipa::IpaShape& d = a.d;
  const AttendSmem& sm = a.sm;
  const int64_t N = d.N, H = d.H, c = d.c, P = d.P, Pv = d.Pv, c_z = d.c_z, Wv = d.value_dim(), czs = sm.czs;
  const int64_t i = blockIdx.x;
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  float* zs = smem + sm.zs;
  float* wb = smem + sm.wb;
  float* qs = smem + sm.qs;
  float* qp = smem + sm.qp;
  float* p = smem + sm.p;
  float* accv = smem + sm.accv;
  float* accp = smem + sm.accp;
  float* m = smem + sm.m;
  float* l = smem + sm.l;
  float* sc = smem + sm.sc;

  for (int64_t e = tid; e < H * c_z; e += blockDim.x) wb[e] = a.wb[e];
  for (int64_t e = tid; e < H * c; e += blockDim.x) qs[e] = a.q[i * H * c + e];
  for (int64_t e = tid; e < H * 3 * P; e += blockDim.x) qp[e] = a.qp[i * H * 3 * P + e];
  for (int64_t e = tid; e < H * Wv; e += blockDim.x) accv[e] = 0.f;
  for (int64_t e = tid; e < H * c_z; e += blockDim.x) accp[e] = 0.f;
  for (int64_t e = tid; e < H; e += blockDim.x) {
    m[e] = -INFINITY;
    l[e] = 0.f;
  }
  __syncthreads();
  const float mi = a.mask[i];
  const ZT* zi = static_cast<const ZT*>(a.z) + i * N * c_z;

  for (int64_t j0 = 0; j0 < N; j0 += T) {
    const int64_t nj = N - j0 < T ? N - j0 : T;
    // 1. Stage the z tile (coalesced: consecutive threads read consecutive channels).
    for (int64_t e = tid; e < nj * c_z; e += blockDim.x) {
      const int64_t jj = e / c_z, kk = e % c_z;
      zs[jj * czs + kk] = load_z(zi, (j0 + jj) * c_z + kk);
    }
    __syncthreads();
    // 2. Logits and the online-softmax update: one warp per head, one lane per key.
    for (int64_t h = warp; h < H; h += AttendTraits::kWarps) {
      const int64_t j = j0 + lane;
      float logit = -INFINITY;
      if (lane < nj) {
        float bias = a.bb[h];
        for (int64_t kk = 0; kk < c_z; ++kk) bias += zs[lane * czs + kk] * wb[h * c_z + kk];
        float qk = 0.f;
        const float* kj = a.k + (j * H + h) * c;
        for (int64_t kk = 0; kk < c; ++kk) qk += qs[h * c + kk] * kj[kk];
        const float d2 = ipa::point_sqdist(qp + h * 3 * P, a.kp + (j * H + h) * 3 * P, P);
        logit = ipa::logit(qk, bias, d2, a.gamma[h], mi, a.mask[j]);
      }
      ipa::OnlineSoftmax st{m[h], l[h]};
      const float scale = ipa::online_softmax_rescale(st, warp_max(logit));
      const float pj = lane < nj ? expf(logit - st.m) : 0.f;
      const float sum = warp_sum(pj);
      p[h * T + lane] = pj;
      __syncwarp();
      if (lane == 0) {
        m[h] = st.m;
        l[h] = st.l + sum;
        sc[h] = scale;
      }
    }
    __syncthreads();
    // 3. Accumulate: values (c scalars + 3 P_v point coordinates) and the pair output.
    const int64_t per_head = Wv + c_z;
    for (int64_t e = tid; e < H * per_head; e += blockDim.x) {
      const int64_t h = e / per_head, r = e % per_head;
      const float* ph = p + h * T;
      if (r < Wv) {
        float acc = accv[h * Wv + r] * sc[h];
        for (int64_t jj = 0; jj < nj; ++jj) acc += ph[jj] * a.v[((j0 + jj) * H + h) * Wv + r];
        accv[h * Wv + r] = acc;
      } else {
        const int64_t kk = r - Wv;
        float acc = accp[h * c_z + kk] * sc[h];
        for (int64_t jj = 0; jj < nj; ++jj) acc += ph[jj] * zs[jj * czs + kk];
        accp[h * c_z + kk] = acc;
      }
    }
    __syncthreads();
  }

  // Normalize and write row i of concat[o, x, y, z, norms, pair].
  float* f = a.feat + i * d.concat_dim();
  const int64_t off_pt = H * c, off_norm = H * (c + 3 * Pv), off_pair = H * (c + 4 * Pv);
  for (int64_t e = tid; e < H * c; e += blockDim.x) {
    const int64_t h = e / c;
    f[e] = accv[h * Wv + e % c] * ipa::online_softmax_inv_sum(ipa::OnlineSoftmax{m[h], l[h]});
  }
  for (int64_t e = tid; e < H * Pv; e += blockDim.x) {
    const int64_t h = e / Pv, pt = e % Pv;
    const float inv = ipa::online_softmax_inv_sum(ipa::OnlineSoftmax{m[h], l[h]});
    const float* g = accv + h * Wv + c + 3 * pt;
    const float gl[3] = {g[0] * inv, g[1] * inv, g[2] * inv};
    float loc[3];
    ipa::frame_invert_apply(a.rot + i * 9, a.tc + i * 3, gl, loc);
    for (int ax = 0; ax < 3; ++ax) f[off_pt + ax * H * Pv + e] = loc[ax];
    f[off_norm + e] = ipa::point_norm(loc);
  }
  for (int64_t e = tid; e < H * c_z; e += blockDim.x) {
    const int64_t h = e / c_z;
    f[off_pair + e] = accp[e] * ipa::online_softmax_inv_sum(ipa::OnlineSoftmax{m[h], l[h]});
  }
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("ipa cuda: ") + what + ": " + cudaGetErrorString(e));
}

void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* w, const float* b, int64_t outs,
            float* y, int64_t ldy, cudaStream_t s) {
  constexpr int T = tiled_linear::kTile;
  const dim3 grid(unsigned((outs + T - 1) / T), unsigned((rows + T - 1) / T));
  ipa_linear_kernel<<<grid, dim3(T, T), 0, s>>>(x, ldx, rows, in, w, b, outs, y, ldy);
  check_launch("ipa_linear_kernel");
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace

size_t ipa_forward_fused_cuda_scratch_bytes(const ipa::IpaShape& shape) {
  return size_t(DeviceLayout(shape).total) * sizeof(float);
}

void ipa_forward_fused_cuda(float* out, const ipa::IpaShape& d, const IpaWeightsF32& w, const IpaActivations& x,
                            void* scratch, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const DeviceLayout lay(d);
  const AttendSmem sm(d);
  const size_t smem_bytes = size_t(sm.total) * sizeof(float);
  int dev = 0, smem_optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    throw std::runtime_error("ipa cuda: cannot query the device");
  if (smem_bytes > size_t(smem_optin))
    throw std::invalid_argument("ipa cuda: shape needs " + std::to_string(smem_bytes) +
                                " bytes of shared memory per block, the device allows " + std::to_string(smem_optin));
  auto attend = x.z_dtype == DType::bf16 ? ipa_attend_kernel<uint16_t> : ipa_attend_kernel<float>;
  if (cudaFuncSetAttribute(attend, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)) != cudaSuccess)
    throw std::runtime_error("ipa cuda: cannot set the attention kernel's shared memory size");

  float* base = static_cast<float*>(scratch);
  float* raw = base + lay.raw;
  const int64_t N = d.N, H = d.H, c = d.c, P = d.P, PP = d.P + d.Pv, ld = lay.raw_ld;
  linear(x.s, d.c_s, N, d.c_s, w.linear_q_w, w.linear_q_b, H * c, raw, ld, s);
  linear(x.s, d.c_s, N, d.c_s, w.linear_kv_w, w.linear_kv_b, 2 * H * c, raw + H * c, ld, s);
  linear(x.s, d.c_s, N, d.c_s, w.linear_qp_w, w.linear_qp_b, 3 * H * P, raw + 3 * H * c, ld, s);
  linear(x.s, d.c_s, N, d.c_s, w.linear_kvp_w, w.linear_kvp_b, 3 * H * PP, raw + 3 * H * c + 3 * H * P, ld, s);

  double* cen = reinterpret_cast<double*>(base + lay.cen);
  ipa_centroid_kernel<<<1, 256, 0, s>>>(x.translations, N, cen);
  check_launch("ipa_centroid_kernel");
  ipa_pack_kernel<<<blocks_for(N * H, 128), 128, 0, s>>>(d, ld, raw, x.rotations, x.translations, cen,
                                                          base + lay.q, base + lay.qp, base + lay.k, base + lay.kp,
                                                          base + lay.v, base + lay.tc);
  check_launch("ipa_pack_kernel");
  ipa_prepare_weights_kernel<<<blocks_for(H * d.c_z, 128), 128, 0, s>>>(
      d, w.linear_b_w, w.linear_b_b, w.head_weights, base + lay.wb, base + lay.bb, base + lay.gamma);
  check_launch("ipa_prepare_weights_kernel");

  // The concatenation reuses the raw region: the pack kernel has consumed it (stream order).
  const AttendParams ap{d,           sm,           x.z,          x.mask,          x.rotations,
                        base + lay.q, base + lay.qp, base + lay.k, base + lay.kp, base + lay.v,
                        base + lay.wb, base + lay.bb, base + lay.gamma, base + lay.tc, raw};
  attend<<<unsigned(N), AttendTraits::kThreads, smem_bytes, s>>>(ap);
  check_launch("ipa_attend_kernel");
  linear(raw, lay.F, N, lay.F, w.linear_out_w, w.linear_out_b, d.c_s, out, d.c_s, s);
}

}  // namespace attnbench::cuda
