// The Pairformer block (AF3 Alg. 17; Boltz-1's PairformerLayer without dropout), composed from
// the registered operations, each with Boltz's module name as its tensors' prefix:
//   z += tri_mul_out(z); z += tri_mul_in(z)                 trimul_af3, outgoing / incoming
//   z += tri_att_start(z); z += tri_att_end(z)              triangle_attention, starting / ending
//   z += transition_z(z)                                    transition, pair track
//   s += attention(s, z); s += transition_s(s)              attention_pair_bias; transition, single
// The pair mask of the z operations is m_i·m_j of the token mask m (the attention's key mask).
// Reference: each operation's own reference, chained (f64 oracle; f32 baseline; bf16 / f16 round
// the block's inputs s and z once and keep f32 between the operations, as the kernels do). CPU:
// each operation's CPU instance, chained, with every operation's time and scratch recorded
// (bench.breakdown). The reference has a backward (the operations' reference backwards in reverse);
// the cpu block is forward only (docs/pairformer.md says why).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness/errors.hpp"
#include "harness/variant.hpp"

namespace attnbench {
namespace {

enum class Track { pair, single };

/// One operation of the block: its prefix (Boltz's module name), the variant that computes it
/// and which track it updates.
struct Op {
  const char* name;
  const char* variant;
  Track track;
};

constexpr Op kOps[] = {
    {"tri_mul_out", "trimul_af3", Track::pair},           {"tri_mul_in", "trimul_af3", Track::pair},
    {"tri_att_start", "triangle_attention", Track::pair}, {"tri_att_end", "triangle_attention", Track::pair},
    {"transition_z", "transition", Track::pair},          {"attention", "attention_pair_bias", Track::single},
    {"transition_s", "transition", Track::single},
};
constexpr int kNumOps = int(sizeof(kOps) / sizeof(kOps[0]));

const Variant& op_variant(int k) { return find_variant(kOps[k].variant, "pairformer"); }

/// The operation's parameters from the block's (completed by the operation's variant).
Params op_params(const Params& p, int k) {
  const std::string name = kOps[k].name;
  const int64_t N = p.at("N"), cz = p.at("c_z"), cs = p.at("c_s"), n = p.at("transition_n");
  Params q;
  if (name == "tri_mul_out" || name == "tri_mul_in")
    q = {{"N", N},
         {"c_z", cz},
         {"c_hidden", p.at("c_hidden_mul")},
         {"direction", name == "tri_mul_out" ? "outgoing" : "incoming"}};
  else if (name == "tri_att_start" || name == "tri_att_end")
    q = {{"N", N}, {"c_z", cz}, {"c", p.at("c_tri")}, {"H", p.at("H_tri")}, {"starting", name == "tri_att_start"}};
  else if (name == "transition_z")
    q = {{"N", N}, {"c", cz}, {"hidden", n * cz}, {"track", "pair"}};
  else if (name == "attention")
    q = {{"N", N}, {"c_s", cs}, {"c_z", cz}, {"H", p.at("H_s")}};
  else
    q = {{"N", N}, {"c", cs}, {"hidden", n * cs}, {"track", "single"}};
  q["std"] = p.at("std");
  return op_variant(k).complete(q, std::string("pairformer: ") + name);
}

/// The names of an operation's activations (everything else it reads is a weight).
std::vector<std::string> activations(int k) {
  const std::string v = kOps[k].variant;
  if (v == "transition") return {"x"};
  if (v == "attention_pair_bias") return {"s", "z", "mask"};
  return {"z", "mask"};
}

bool is_activation(int k, const std::string& name) {
  for (const auto& a : activations(k))
    if (a == name) return true;
  return false;
}

/// The pair mask m_i·m_j (N, N) of the token mask, in the mask's dtype.
Tensor pair_mask(const Tensor& m) {
  const int64_t N = m.numel();
  Tensor pm(m.dtype(), {N, N});
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) pm.set(i * N + j, m.get(i) * m.get(j));
  return pm;
}

/// Operation k's weights from the block's inputs (prefix stripped).
TensorMap op_weights(const TensorMap& in, int k) {
  const std::string prefix = std::string(kOps[k].name) + ".";
  TensorMap w;
  for (const auto& [name, t] : in)
    if (name.rfind(prefix, 0) == 0) w.emplace(name.substr(prefix.size()), t);
  return w;
}

/// a + b elementwise into a tensor of `dtype` (f32 adds in float, like the kernels).
Tensor add(const Tensor& a, const Tensor& b, DType dtype) {
  Tensor r(dtype, a.shape());
  for (int64_t i = 0; i < a.numel(); ++i)
    r.set(i, dtype == DType::f64 ? a.get(i) + b.get(i) : double(float(a.get(i)) + float(b.get(i))));
  return r;
}

/// The input an operation reads its track from ("z" or "x"; the attention's "s").
std::string track_input(int k) {
  const std::string v = kOps[k].variant;
  if (v == "transition") return "x";
  return kOps[k].track == Track::single ? "s" : "z";
}

/// The CPU block: every operation's CPU instance on its own f32 inputs (the weights copied and
/// 16-bit s and z widened at setup), the running z or s written by run() into the next reader's
/// input tensor, each operation timed. Forward only (docs/pairformer.md says why).
class PairformerCpuInstance final : public Instance {
 public:
  explicit PairformerCpuInstance(const ImplArgs& a) : ops_(size_t(kNumOps)) {
    const TensorMap& in = a.inputs;
    const std::string who = "pairformer cpu";
    const Tensor pm = pair_mask(require(in, "mask", who).to(DType::f32));
    const Shape z_shape = require(in, "z", who).shape(), s_shape = require(in, "s", who).shape();
    z_out_ = &a.outputs.at("z_out");
    s_out_ = &a.outputs.at("s_out");
    for (int k = 0; k < kNumOps; ++k) {
      OpRun& op = ops_[size_t(k)];
      op.params = op_params(a.params, k);
      op.inputs = op_weights(in, k);
      const std::string v = kOps[k].variant;
      const Shape& shape = kOps[k].track == Track::pair ? z_shape : s_shape;
      if (k == 0)
        op.inputs.emplace("z", in.at("z").to(DType::f32));
      else if (k == kSingle)
        op.inputs.emplace("s", in.at("s").to(DType::f32));
      else
        op.inputs.emplace(track_input(k), Tensor(DType::f32, shape));
      if (v == "attention_pair_bias") op.inputs.emplace("z", Tensor(DType::f32, z_shape));
      if (v == "attention_pair_bias")
        op.inputs.emplace("mask", in.at("mask").to(DType::f32));
      else if (v != "transition")
        op.inputs.emplace("mask", pm);
      for (const auto& spec : op_variant(k).outputs(op.params, DType::f32))
        op.outputs.emplace(spec.name, Tensor(spec.dtype, spec.shape));
      const size_t before = a.workspace.current_bytes();
      op.args =
          std::make_unique<ImplArgs>(ImplArgs{op.params, DType::f32, op.inputs, op.outputs, a.workspace, Pass::fwd});
      op.inst = op_variant(k).find_impl("cpu")->make(*op.args);
      op.bytes = a.workspace.current_bytes() - before;
    }
  }

  void run() override {
    using Clock = std::chrono::steady_clock;
    for (int k = 0; k < kNumOps; ++k) {
      OpRun& op = ops_[size_t(k)];
      const auto t0 = Clock::now();
      op.inst->run();
      op.inst->finish();
      const Tensor& x = op.inputs.at(track_input(k));
      const Tensor& out = op.outputs.at("output");
      // The residual sum goes where the next reader of this track takes it.
      if (k + 1 == kSingle) {  // the last z operation: z_out, which the attention reads too
        add_f32(x, out, *z_out_);
        std::copy(z_out_->data<float>(), z_out_->data<float>() + z_out_->numel(),
                  ops_[kSingle].inputs.at("z").data<float>());
      } else if (k + 1 < kNumOps) {
        add_f32(x, out, ops_[size_t(k + 1)].inputs.at(track_input(k + 1)));
      } else {
        add_f32(x, out, *s_out_);
      }
      op.seconds.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
  }

  /// bench.breakdown: per operation in execution order, the median of its times over every call
  /// (its residual sum included) and the scratch its instance took (docs/plots.md).
  nlohmann::json info() const override {
    nlohmann::json rows = nlohmann::json::array();
    for (int k = 0; k < kNumOps; ++k) {
      std::vector<double> t = ops_[size_t(k)].seconds;
      std::sort(t.begin(), t.end());
      const double median = t.empty()      ? 0.0
                            : t.size() % 2 ? t[t.size() / 2]
                                           : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
      rows.push_back({{"op", kOps[k].name}, {"s", median}, {"bytes", ops_[size_t(k)].bytes}});
    }
    return {{"breakdown", rows}};
  }

 private:
  static constexpr int kSingle = 5;  // the first operation on s (the attention)
  struct OpRun {
    Params params;
    TensorMap inputs, outputs;
    std::unique_ptr<ImplArgs> args;  // the instance keeps references into it
    std::unique_ptr<Instance> inst;
    size_t bytes = 0;
    std::vector<double> seconds;  // per call of run()
  };

  /// r = a + b (all f32), in parallel.
  static void add_f32(const Tensor& a, const Tensor& b, Tensor& r) {
    const float* pa = a.data<float>();
    const float* pb = b.data<float>();
    float* pr = r.data<float>();
    const int64_t n = r.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) pr[i] = pa[i] + pb[i];
  }

  std::vector<OpRun> ops_;
  Tensor* z_out_ = nullptr;
  Tensor* s_out_ = nullptr;
};

/// The reference forward of the block: every operation's inputs on the way (for the backward)
/// and the final s and z, in f64 (the oracle) or f32 on the block's inputs rounded to `dtype`.
struct Chain {
  DType dtype, round;
  std::vector<TensorMap> inputs;  // operation k's weights and activations
  Tensor s, z;
  /// Block input `name`, rounded to the block's dtype (16-bit) once.
  Tensor rounded(const TensorMap& in, const char* name) const {
    Tensor t = require(in, name, "pairformer reference");
    if (is_16bit(round))
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, round_to(round, t.get(i)));
    return t;
  }
};

Chain chain(const Params& p, const TensorMap& in, DType dtype) {
  Chain c{dtype == DType::f64 ? DType::f64 : DType::f32, dtype, {}, {}, {}};
  c.z = c.rounded(in, "z");
  c.s = c.rounded(in, "s");
  const Tensor& mask = require(in, "mask", "pairformer reference");
  const Tensor pm = pair_mask(mask);
  for (int k = 0; k < kNumOps; ++k) {
    TensorMap sub = op_weights(in, k);
    const std::string v = kOps[k].variant;
    if (v == "transition") {
      sub.emplace("x", kOps[k].track == Track::pair ? c.z : c.s);
    } else if (v == "attention_pair_bias") {
      sub.emplace("s", c.s);
      sub.emplace("z", c.z);
      sub.emplace("mask", mask);
    } else {
      sub.emplace("z", c.z);
      sub.emplace("mask", pm);
    }
    const Tensor out = op_variant(k).reference(op_params(p, k), sub, c.dtype).at("output");
    Tensor& track = kOps[k].track == Track::pair ? c.z : c.s;
    track = add(track, out, c.dtype);
    c.inputs.push_back(std::move(sub));
  }
  return c;
}

class PairformerVariant final : public Variant {
 public:
  std::string name() const override { return "pairformer"; }
  std::string summary() const override {
    return "the Pairformer block (AF3 Alg. 17, Boltz PairformerLayer): triangle multiplications, triangle "
           "attentions and transition on z, attention with pair bias and transition on s, composed from those "
           "variants, with a per-operation time and memory breakdown; forward only";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"N", int64_t(64), "tokens (s is N × c_s, z is N × N × c_z)"},
        {"c_s", int64_t(384), "single representation channels"},
        {"c_z", int64_t(128), "pair representation channels"},
        {"c_hidden_mul", int64_t(128), "hidden channels of the triangle multiplications (Boltz: c_z)"},
        {"c_tri", int64_t(32), "channels per head of the triangle attentions"},
        {"H_tri", int64_t(4), "heads of the triangle attentions"},
        {"H_s", int64_t(16), "heads of the attention with pair bias"},
        {"transition_n", int64_t(4), "transition hidden width as a multiple of its channels"},
        {"mask_fraction", 0.0, "fraction of tokens masked (pair mask m_i·m_j)"},
        input_std_param("operations' layer-norm outputs (each operation's own std)"),
    };
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    v.push_back({"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16}, [](const ImplArgs& a) {
                   return std::make_unique<PairformerCpuInstance>(a);
                 }});
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* k : {"N", "c_s", "c_z", "c_hidden_mul", "c_tri", "H_tri", "H_s", "transition_n"})
      if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
    const double f = p.at("mask_fraction").get<double>();
    if (!(f >= 0.0 && f <= 1.0)) throw InputError("mask_fraction: expected a number in [0, 1]");
    for (int k = 0; k < kNumOps; ++k) op_params(p, k);  // each operation's own limits (H_s divides c_s, N ...)
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const int64_t N = p.at("N"), cs = p.at("c_s"), cz = p.at("c_z");
    TensorMap m;
    auto normal = [&](const std::string& name, const Shape& shape) {
      Tensor t(DType::f64, shape);
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, rng.normal());
      return t;
    };
    m.emplace("s", normal("s", {N, cs}));
    m.emplace("z", normal("z", {N, N, cz}));
    Tensor mask(DType::f64, {N});
    std::vector<int64_t> order(static_cast<size_t>(N));
    std::iota(order.begin(), order.end(), 0);
    Rng rm(seed, key, "mask");
    for (int64_t i = N - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(rm.integer(0, i))]);
    const auto masked = int64_t(std::llround(p.at("mask_fraction").get<double>() * double(N)));
    for (int64_t i = 0; i < N; ++i) mask.set(order[size_t(i)], i < masked ? 0.0 : 1.0);
    m.emplace("mask", std::move(mask));
    for (int k = 0; k < kNumOps; ++k)
      for (auto& [name, t] : op_variant(k).make_inputs(op_params(p, k), seed, key + "/" + kOps[k].name))
        if (!is_activation(k, name)) m.emplace(std::string(kOps[k].name) + "." + name, std::move(t));
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    const int64_t N = p.at("N"), cs = p.at("c_s"), cz = p.at("c_z");
    const DType o = dtype == DType::f64 ? DType::f64 : DType::f32;
    return {{"s_out", o, {N, cs}}, {"z_out", o, {N, N, cz}}};
  }

  /// f64 → everything f64; f32 → f32; bf16 / f16 → s, z and their cotangents in that dtype, the
  /// weights and the mask f32 (every operation computes in f32).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const bool activation = name == "s" || name == "z" || name == "ds_out" || name == "dz_out";
      const DType want = is_16bit(dtype) && !activation ? DType::f32 : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  /// The operations' references chained: in f64 for the oracle, else in f32 on the block's
  /// inputs rounded to `dtype` once (the f32 sums between operations, as in the kernels).
  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const Chain c = chain(p, in, dtype);
    TensorMap r;
    r.emplace("s_out", c.s.to(c.dtype));
    r.emplace("z_out", c.z.to(c.dtype));
    return r;
  }

  std::vector<std::string> differentiable() const override {
    std::vector<std::string> v = {"s", "z"};
    for (int k = 0; k < kNumOps; ++k)
      for (const auto& x : op_variant(k).differentiable())
        if (!is_activation(k, x)) v.push_back(std::string(kOps[k].name) + "." + x);
    return v;
  }

  /// The operations' reference backwards in reverse order on the chained forward's inputs; the
  /// residual sums pass each cotangent on and add the operation's input gradient to it.
  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const Chain c = chain(p, in, dtype);
    Tensor ds = c.rounded(in, "ds_out"), dz = c.rounded(in, "dz_out");
    TensorMap r;
    for (int k = kNumOps - 1; k >= 0; --k) {
      TensorMap sub = c.inputs[size_t(k)];
      Tensor& dy = kOps[k].track == Track::pair ? dz : ds;
      sub.emplace("doutput", dy);
      TensorMap g = op_variant(k).reference_backward(op_params(p, k), sub, c.dtype);
      const std::string v = kOps[k].variant, x = v == "transition" ? "x" : kOps[k].track == Track::pair ? "z" : "s";
      dy = add(dy, g.at("d" + x), c.dtype);
      if (v == "attention_pair_bias") dz = add(dz, g.at("dz"), c.dtype);
      for (auto& [name, t] : g)
        if (!is_activation(k, name.substr(1)))
          r.emplace("d" + std::string(kOps[k].name) + "." + name.substr(1), std::move(t));
    }
    r.emplace("ds", ds.to(c.dtype));
    r.emplace("dz", dz.to(c.dtype));
    return r;
  }

  /// The operations' FLOPs summed, plus the residual sums.
  double flops(const Params& p) const override {
    double f = 0;
    for (int k = 0; k < kNumOps; ++k) f += op_variant(k).flops(op_params(p, k));
    const double N = double(p.at("N").get<int64_t>());
    return f + 5.0 * N * N * double(p.at("c_z").get<int64_t>()) + 2.0 * N * double(p.at("c_s").get<int64_t>());
  }
  double backward_flops(const Params& p) const override {
    double f = 0;
    for (int k = 0; k < kNumOps; ++k) f += op_variant(k).backward_flops(op_params(p, k));
    const double N = double(p.at("N").get<int64_t>());
    return f + 6.0 * N * N * double(p.at("c_z").get<int64_t>()) + 2.0 * N * double(p.at("c_s").get<int64_t>());
  }
  /// The operations' own backward models summed, plus the running cotangents.
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    double b = 0.0;
    for (int k = 0; k < kNumOps; ++k) b += op_variant(k).backward_memory_bytes(op_params(p, k), impl, DType::f32);
    const double N = double(p.at("N").get<int64_t>());
    return b + 2.0 * N * N * double(p.at("c_z").get<int64_t>()) * 8.0;
  }
  /// An upper bound: the operations' own models summed (each counts its own copy of the inputs)
  /// plus the block's running z per pair operation.
  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    double b = 0;
    for (int k = 0; k < kNumOps; ++k) b += op_variant(k).memory_bytes(op_params(p, k), impl, DType::f32);
    const double N = double(p.at("N").get<int64_t>());
    return b + 6.0 * N * N * double(p.at("c_z").get<int64_t>()) * 4.0;
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 1},
         {"c_s", 8},
         {"c_z", 4},
         {"c_hidden_mul", 3},
         {"c_tri", 2},
         {"H_tri", 2},
         {"H_s", 2},
         {"transition_n", 2}},
        {{"N", 9},
         {"c_s", 12},
         {"c_z", 8},
         {"c_hidden_mul", 5},
         {"c_tri", 3},
         {"H_tri", 2},
         {"H_s", 3},
         {"transition_n", 3},
         {"mask_fraction", 0.3}},
        {{"N", 33},
         {"c_s", 16},
         {"c_z", 12},
         {"c_hidden_mul", 12},
         {"c_tri", 4},
         {"H_tri", 3},
         {"H_s", 4},
         {"transition_n", 4},
         {"mask_fraction", 0.1}},
    };
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(PairformerVariant);

}  // namespace attnbench
