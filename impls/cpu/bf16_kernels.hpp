// Native bf16 micro-kernels of the CPU attention forward (issue 13 item 3) and
// the probes `attnbench roofline` measures their peaks with. Compiled with
// per-function target attributes (AVX512-BF16, AMX-BF16), so one build runs
// everywhere: call them only where cpu_features() says the machine has them
// (the AMX ones only after the tile-data permission, which cpu_features()
// requests). Internal to impls/cpu (attention-inl.h); not a public API.
//
// Layouts (bf16 as uint16_t bit patterns, rows contiguous):
//   qb (rows16, dk)        query rows, D zero-padded to dk (a multiple of 32), rows to a multiple of 16
//   kb (dk/2, ld, 2)       a key tile in pairs along D: kb[(p·ld + j)·2 + e] = k_j[2p + e]
//   vb (n/2, dp, 2)        a value tile in pairs along keys: vb[(jp·dp + d)·2 + e] = v_{2jp+e}[d]
//   s, o                   f32 (rows16, ld) score and output tiles
#pragma once

#include <cstdint>

namespace attnbench::cpu::bf16k {

/// s[r][j] = Σ_d q_r[d]·k_j[d] (f32 accumulation, no scale) for r < rows16, j < ncols
/// (a multiple of 32) on AMX tiles.
void scores_amx(int64_t rows16, int64_t dk, const uint16_t* qb, const uint16_t* kb, int64_t ld, int64_t ncols,
                float* s, int64_t s_ld);

/// The same for r < rows on VDPBF16PS (ncols a multiple of 64).
void scores_dpbf16(int64_t rows, int64_t dk, const uint16_t* qb, const uint16_t* kb, int64_t ld, int64_t ncols,
                   float* s, int64_t s_ld);

/// o[r][0:dp] = alpha[r]·o[r][0:dp] + Σ_{j<n} p[r][j]·v_j[0:dp] for r < rows16 on
/// AMX tiles, n a multiple of 32, dp a multiple of 16. P is not rounded to bf16:
/// each p is split into three bf16 parts p = hi + mid + lo (exact to within
/// 2⁻²⁴ relative, f32's own rounding), each multiplied by the exact bf16 V.
/// pb: scratch of 3·rows16·n bf16.
void accumulate_amx(int64_t rows16, int64_t n, const float* p, int64_t p_ld, const uint16_t* vb, int64_t dp,
                    const float* alpha, float* o, int64_t o_ld, uint16_t* pb);

/// Roofline probes: FLOPs executed by `iters` rounds of independent VDPBF16PS
/// chains / AMX TDPBF16PS tiles on this thread (result stored to *sink).
double dpbf16_probe(int64_t iters, float* sink);
double amx_probe(int64_t iters, float* sink);

}  // namespace attnbench::cpu::bf16k
