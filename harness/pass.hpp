// The pass axis of a case (DESIGN §4 "Passes"): forward, backward, or both.
//
//   fwd      the forward: outputs from inputs (every suite's default)
//   bwd      the backward alone: gradients of Σ (cotangent ⊙ output) with
//            respect to every differentiable input; the forward runs in setup
//            and saves what the backward reads (o, the log-sum-exp), so a bwd
//            time excludes it
//   fwd_bwd  both, in one timed call (a training step's attention cost)
//
// FLOPs follow FlashAttention's convention for attention: bwd = 2.5 × fwd,
// fwd_bwd = 3.5 × fwd (Variant::flops may count its own).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace attnbench {

enum class Pass { fwd, bwd, fwd_bwd };

std::string_view pass_name(Pass p);
/// The pass named `s` or an InputError "<where>: unknown pass 's', expected fwd, bwd or fwd_bwd (did you mean ...)".
Pass parse_pass(const std::string& s, const std::string& where);
/// Does the pass run the backward (bwd, fwd_bwd)?
inline bool runs_backward(Pass p) { return p != Pass::fwd; }
/// Does the pass time the forward (fwd, fwd_bwd)?
inline bool runs_forward(Pass p) { return p != Pass::bwd; }
/// Name of the gradient of input `x` ("q" → "dq") and of the cotangent of output `y` ("o" → "do").
inline std::string grad_name(const std::string& x) { return "d" + x; }

}  // namespace attnbench
