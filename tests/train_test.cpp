// attnbench train: the GPT layers' backward against finite differences (f64),
// the whole model's loss gradient (f64), one f32 training step against the f64
// step, the tokenizer, bad data files, suites, resume equivalence and sampling.
#include <array>
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/errors.hpp"
#include "harness/rng.hpp"
#include "harness/safetensors.hpp"
#include "harness/train/data.hpp"
#include "harness/train/gpt.hpp"
#include "harness/train/trainer.hpp"
#include "impls/cpu/gpt_layers.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;
using namespace attnbench;
using namespace attnbench::train;
using nlohmann::json;

namespace {

std::vector<double> randn(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& x : v) x = r.normal() * scale;
  return v;
}

/// Central differences of f at x against the analytic gradient g; returns the
/// largest |fd − g| over max(1, |g|) (f64: h = 1e-6 leaves ~1e-9 of error).
/// `only`, when set, lists the entries to check.
double fd_error(std::vector<double>& x, const std::vector<double>& g, const std::function<double()>& f,
                double h = 1e-6, const std::vector<size_t>* only = nullptr) {
  double worst = 0;
  std::vector<size_t> all;
  if (!only) {
    for (size_t i = 0; i < x.size(); ++i) all.push_back(i);
    only = &all;
  }
  for (size_t i : *only) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f();
    x[i] = x0 - h;
    const double fm = f();
    x[i] = x0;
    const double fd = (fp - fm) / (2 * h);
    worst = std::max(worst, std::abs(fd - g[i]) / std::max(1.0, std::abs(g[i])));
  }
  return worst;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("attnbench_train_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write_file(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("gpt layers: linear backward matches finite differences (f64)", "[train][layers]") {
  const int64_t N = 5, in = 7, out = 3;
  auto x = randn(N * in, 1), W = randn(out * in, 2), w = randn(N * out, 3);
  std::vector<double> y(static_cast<size_t>(N * out)), dx(x.size()), dW(W.size());
  auto f = [&] {
    gpt::linear_forward(y.data(), x.data(), W.data(), N, in, out, 2);
    return dot(y, w);
  };
  gpt::linear_backward(dx.data(), dW.data(), w.data(), x.data(), W.data(), N, in, out, false, 2);
  CHECK(fd_error(x, dx, f) < 1e-7);
  CHECK(fd_error(W, dW, f) < 1e-7);
  // accumulate_dx adds to what is there.
  std::vector<double> dx2(x.size(), 1.0);
  gpt::linear_backward<double>(dx2.data(), nullptr, w.data(), x.data(), W.data(), N, in, out, true, 3);
  for (size_t i = 0; i < dx.size(); ++i) CHECK(dx2[i] == Approx(dx[i] + 1.0).epsilon(1e-12));
}

TEST_CASE("gpt layers: the f32 linear (the kernels' GEMM) matches the f64 one on odd shapes", "[train][layers]") {
  // Inputs rounded to f32 first, so the f64 products are exact references for the same
  // operands; each f32 element must then be within the rigorous dot-product bound
  // K · 2^-24 · Σ_k |a_k b_k| (+ one rounding of the accumulated 0.5 in dx).
  auto to_f32 = [](std::vector<double> v) {
    for (double& e : v) e = double(float(e));
    return v;
  };
  auto abs_of = [](std::vector<double> v) {
    for (double& e : v) e = std::abs(e);
    return v;
  };
  auto as_float = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  for (auto [N, in, out] : {std::array<int64_t, 3>{1, 1, 1}, {37, 19, 53}, {300, 64, 257}, {5, 260, 3}}) {
    INFO("N " << N << " in " << in << " out " << out);
    const auto x = to_f32(randn(N * in, 7)), W = to_f32(randn(out * in, 8)), dy = to_f32(randn(N * out, 9));
    std::vector<double> y(size_t(N * out)), dx(x.size(), 0.5), dW(W.size());
    std::vector<double> ya(y.size()), dxa(dx.size(), 0.0), dWa(dW.size());
    gpt::linear_forward(y.data(), x.data(), W.data(), N, in, out, 2);
    gpt::linear_backward(dx.data(), dW.data(), dy.data(), x.data(), W.data(), N, in, out, true, 2);
    const auto xa = abs_of(x), Wa = abs_of(W), dya = abs_of(dy);
    gpt::linear_forward(ya.data(), xa.data(), Wa.data(), N, in, out, 2);
    gpt::linear_backward(dxa.data(), dWa.data(), dya.data(), xa.data(), Wa.data(), N, in, out, false, 2);
    const auto xf = as_float(x), Wf = as_float(W), dyf = as_float(dy);
    std::vector<float> yf(y.size(), 123.0f), dxf(dx.size(), 0.5f), dWf(dW.size(), 123.0f);
    gpt::linear_forward(yf.data(), xf.data(), Wf.data(), N, in, out, 2);
    gpt::linear_backward(dxf.data(), dWf.data(), dyf.data(), xf.data(), Wf.data(), N, in, out, true, 2);
    auto check = [](const char* what, const std::vector<double>& want, const std::vector<float>& got,
                    const std::vector<double>& abs_sum, int64_t K, double extra) {
      int64_t bad = 0;
      for (size_t i = 0; i < want.size(); ++i)
        if (!(std::abs(double(got[i]) - want[i]) <= double(K + 1) * 0x1.0p-24 * abs_sum[i] + extra)) ++bad;
      INFO(what);
      CHECK(bad == 0);
    };
    check("y", y, yf, ya, in, 0.0);
    check("dx", dx, dxf, dxa, out, 0x1.0p-24 * 2.0);
    check("dW", dW, dWf, dWa, N, 0.0);
  }
}

TEST_CASE("gpt layers: layernorm backward matches finite differences (f64)", "[train][layers]") {
  const int64_t N = 4, C = 6;
  auto x = randn(N * C, 4, 2.0), g = randn(C, 5), w = randn(N * C, 6);
  std::vector<double> y(x.size()), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N)), dx(x.size()), dg(g.size());
  auto f = [&] {
    gpt::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), N, C, 1e-5, 2);
    return dot(y, w);
  };
  f();
  gpt::layernorm_backward(dx.data(), dg.data(), w.data(), x.data(), mean.data(), rstd.data(), g.data(), N, C, 2);
  CHECK(fd_error(x, dx, f) < 1e-7);
  CHECK(fd_error(g, dg, f) < 1e-7);
}

TEST_CASE("gpt layers: relu, embedding and cross-entropy backward match finite differences (f64)",
          "[train][layers]") {
  SECTION("relu (inputs away from the kink)") {
    auto x = randn(40, 7);
    for (auto& v : x)
      if (std::abs(v) < 1e-3) v = 0.5;
    auto w = randn(40, 8);
    std::vector<double> y(x.size()), dx(x.size());
    auto f = [&] {
      gpt::relu_forward(y.data(), x.data(), int64_t(x.size()), 2);
      return dot(y, w);
    };
    gpt::relu_backward(dx.data(), w.data(), x.data(), int64_t(x.size()), 2);
    CHECK(fd_error(x, dx, f) < 1e-7);
  }
  SECTION("embedding (repeated tokens sum)") {
    const int64_t V = 5, C = 3, N = 7;
    const std::vector<int32_t> tok{0, 3, 3, 1, 4, 3, 0};
    auto wte = randn(V * C, 9), w = randn(N * C, 10);
    std::vector<double> y(static_cast<size_t>(N * C)), dw(wte.size());
    auto f = [&] {
      gpt::embedding_forward(y.data(), tok.data(), wte.data(), N, C, 2);
      return dot(y, w);
    };
    gpt::embedding_backward(dw.data(), w.data(), tok.data(), N, V, C);
    CHECK(fd_error(wte, dw, f) < 1e-7);
  }
  SECTION("cross-entropy (ignored targets count for nothing)") {
    const int64_t N = 6, V = 5;
    auto logits = randn(N * V, 11, 3.0);
    const std::vector<int32_t> t{1, -1, 4, 0, -1, 2};
    std::vector<double> dl(logits.size()), rows(static_cast<size_t>(N));
    const double scale = 1.0 / 4;
    auto f = [&] { return gpt::cross_entropy<double>(nullptr, rows.data(), logits.data(), t.data(), N, V, scale, 2).loss_sum * scale; };
    const auto st = gpt::cross_entropy(dl.data(), rows.data(), logits.data(), t.data(), N, V, scale, 2);
    CHECK(st.count == 4);
    CHECK(fd_error(logits, dl, f) < 1e-7);
    for (int64_t v = 0; v < V; ++v) CHECK(dl[size_t(1 * V + v)] == 0.0);
    // top-1: make row 0's target the clear maximum.
    logits[1] = 100;
    CHECK(gpt::cross_entropy<double>(nullptr, rows.data(), logits.data(), t.data(), N, V, 1, 1).correct >= 1);
  }
  SECTION("adam matches the closed form of its first step") {
    std::vector<double> p{1.0, -2.0}, g{0.5, -0.25}, m(2, 0.0), v(2, 0.0);
    gpt::AdamParams a;
    a.lr = 0.1;
    a.step = 1;
    gpt::adam_update(p.data(), g.data(), m.data(), v.data(), 2, a, 1);
    // m̂ = g, v̂ = g²: the first step is lr · sign(g) (up to eps).
    CHECK(p[0] == Approx(1.0 - 0.1).epsilon(1e-6));
    CHECK(p[1] == Approx(-2.0 + 0.1).epsilon(1e-6));
  }
}

TEST_CASE("gpt layers: the block options' layers backward match finite differences (f64)", "[train][layers]") {
  SECTION("sigmoid gate") {
    auto pre = randn(30, 21, 2.0), a = randn(30, 22), w = randn(30, 23);
    std::vector<double> g(pre.size()), y(pre.size()), da(pre.size()), dpre(pre.size());
    auto f = [&] {
      g = pre;
      gpt::sigmoid_gate_forward(y.data(), g.data(), a.data(), 30, 2);
      return dot(y, w);
    };
    f();
    std::vector<double> dy = w;  // da aliases dy, as the model calls it
    gpt::sigmoid_gate_backward(dy.data(), dpre.data(), dy.data(), a.data(), g.data(), 30, 2);
    CHECK(fd_error(pre, dpre, f) < 1e-7);
    CHECK(fd_error(a, dy, f) < 1e-7);
  }
  SECTION("swiglu") {
    auto h = randn(30, 24, 2.0), u = randn(30, 25), w = randn(30, 26);
    std::vector<double> y(h.size()), du(h.size());
    auto f = [&] {
      gpt::swiglu_forward(y.data(), h.data(), u.data(), 30, 2);
      return dot(y, w);
    };
    std::vector<double> dh = w;  // dh aliases dy
    gpt::swiglu_backward(dh.data(), du.data(), dh.data(), h.data(), u.data(), 30, 2);
    CHECK(fd_error(h, dh, f) < 1e-7);
    CHECK(fd_error(u, du, f) < 1e-7);
  }
  SECTION("LayerScale residual") {
    const int64_t N = 5, C = 4;
    auto x = randn(N * C, 27), fv = randn(N * C, 28), gamma = randn(C, 29), w = randn(N * C, 30);
    std::vector<double> r(x.size()), df(x.size()), dgamma(gamma.size());
    auto f = [&] {
      gpt::scaled_residual_forward(r.data(), x.data(), gamma.data(), fv.data(), N, C, 2);
      return dot(r, w);
    };
    gpt::scaled_residual_backward(df.data(), dgamma.data(), w.data(), fv.data(), gamma.data(), N, C, 2);
    CHECK(fd_error(fv, df, f) < 1e-7);
    CHECK(fd_error(gamma, dgamma, f) < 1e-7);
    CHECK(fd_error(x, w, f) < 1e-7);  // the residual passes dr through
  }
  SECTION("value mix") {
    const int64_t N = 3, H = 2, dh = 3, n = N * H * dh;
    auto vl = randn(n, 31), v1 = randn(n, 32), z = randn(N * H, 33, 2.0), w = randn(n, 34);
    std::vector<double> v(static_cast<size_t>(n)), dz(z.size()), dv1(static_cast<size_t>(n), 0.5);
    auto f = [&] {
      gpt::value_mix_forward(v.data(), vl.data(), v1.data(), z.data(), N, H, dh, 2);
      return dot(v, w);
    };
    std::vector<double> dvl = w;  // dvl aliases dv
    gpt::value_mix_backward(dvl.data(), dv1.data(), dz.data(), dvl.data(), vl.data(), v1.data(), z.data(), N, H, dh, 2);
    for (auto& e : dv1) e -= 0.5;  // dv1 is accumulated into
    CHECK(fd_error(vl, dvl, f) < 1e-7);
    CHECK(fd_error(v1, dv1, f) < 1e-7);
    CHECK(fd_error(z, dz, f) < 1e-7);
  }
}

namespace {

GptConfig tiny_config(AttentionKind k, bool rope) {
  GptConfig c;
  c.vocab = 7;
  c.d = 8;
  c.heads = 2;
  c.layers = 2;
  c.context = 5;
  c.rope = rope;
  c.attention = k;
  c.window = 3;  // `window` attention: 3 of the 5 positions
  return c;
}

void tiny_batch(const GptConfig& c, int64_t B, std::vector<int32_t>& x, std::vector<int32_t>& y) {
  Rng r(42);
  x.resize(size_t(B * c.context));
  y.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = int32_t(r.integer(0, c.vocab - 1));
    y[i] = int32_t(r.integer(0, c.vocab - 1));
  }
  y[1] = -1;  // one position not counted
}

/// Every block option on (value residual `token` or `learned`; none for
/// selective attention, which does not take it).
BlockOptions all_options(AttentionKind k, ValueResidual vr) {
  BlockOptions o;
  o.gate = o.glu = true;
  o.layer_scale = 0.5;
  if (has_shared_values(k)) o.value_residual = vr;
  return o;
}

/// The configurations the model tests cover: each attention kind plain, and
/// with every block option (both value residual forms on standard attention).
std::vector<std::pair<AttentionKind, BlockOptions>> model_configs(std::vector<AttentionKind> kinds) {
  std::vector<std::pair<AttentionKind, BlockOptions>> out;
  for (AttentionKind k : kinds) {
    out.push_back({k, BlockOptions{}});
    out.push_back({k, all_options(k, ValueResidual::token)});
  }
  out.push_back({AttentionKind::standard, all_options(AttentionKind::standard, ValueResidual::learned)});
  return out;
}

/// The gate weights and value-residual logits start at 0, where the gate's
/// path to x carries no gradient: move them off it so the checks see it.
template <class Real>
void leave_zero_init(Gpt<Real>& m) {
  Rng r(77);
  for (const ParamInfo& pi : m.layout()) {
    if (pi.weight == "wg" || pi.weight == "vres")
      for (int64_t i = 0; i < pi.numel; ++i) m.params()[pi.offset + i] = Real(r.uniform(-0.5, 0.5));
  }
}

std::string options_name(const BlockOptions& o) {
  return std::string(o.gate ? " gate" : "") + " value_residual " + value_residual_name(o.value_residual) +
         " layer_scale " + std::to_string(o.layer_scale) + (o.glu ? " glu" : "");
}

}  // namespace

TEST_CASE("gpt: the whole model's loss gradient matches finite differences (f64)", "[train][model]") {
  for (const auto& [k, opt] :
       model_configs({AttentionKind::standard, AttentionKind::selective, AttentionKind::window})) {
    for (bool rope : {true, false}) {
      INFO(attention_kind_name(k) << " rope " << rope << options_name(opt));
      GptConfig c = tiny_config(k, rope);
      c.block = opt;
      c.layers = 3;  // value residual: two blocks mix the first one's values
      Gpt<double> m(c, 2, 1);
      m.init(3);
      leave_zero_init(m);
      std::vector<int32_t> x, y;
      tiny_batch(c, 2, x, y);
      const auto st = m.step(x.data(), y.data(), true);
      CHECK(st.count == 9);
      const int64_t n = m.num_params();
      std::vector<double> g(m.grads(), m.grads() + n), p(m.params(), m.params() + n);
      auto f = [&] {
        std::copy(p.begin(), p.end(), m.params());
        const auto s = m.step(x.data(), y.data(), false);
        return s.loss_sum / double(s.count);
      };
      // Up to 6 entries of every parameter tensor (the first, the last and
      // evenly spaced ones between): every weight kind of every layer.
      std::vector<size_t> pick;
      for (const ParamInfo& pi : m.layout())
        for (int64_t s = 0; s < 6; ++s) pick.push_back(size_t(pi.offset + s * (pi.numel - 1) / 5));
      CHECK(fd_error(p, g, f, 1e-5, &pick) < 1e-6);
    }
  }
}

TEST_CASE("gpt: one f32 training step equals the f64 step within the rule", "[train][model]") {
  // The rule: f32 with f32 accumulation over at most a few hundred terms per
  // dot product (d, 4d, T): relative errors ~ sqrt(terms) · 2⁻²⁴ ≈ 1e-6; we
  // allow 2e-4 of each gradient tensor's largest entry (and 1e-5 relative on
  // the loss), far below what a wrong term (≥ 1e-2 relative) would give.
  for (const auto& [k, opt] : model_configs({AttentionKind::standard, AttentionKind::selective,
                                             AttentionKind::selective_materialized, AttentionKind::window})) {
    INFO(attention_kind_name(k) << options_name(opt));
    GptConfig c = tiny_config(k, true);
    c.block = opt;
    c.d = 16;
    c.context = 13;
    c.window = 4;
    Gpt<float> mf(c, 3, 2);
    Gpt<double> md(c, 3, 2);
    mf.init(5);
    leave_zero_init(mf);
    const int64_t n = mf.num_params();
    for (int64_t i = 0; i < n; ++i) md.params()[i] = double(mf.params()[i]);
    std::vector<int32_t> x, y;
    tiny_batch(c, 3, x, y);
    const auto sf = mf.step(x.data(), y.data(), true);
    const auto sd = md.step(x.data(), y.data(), true);
    CHECK(sf.loss_sum == Approx(sd.loss_sum).epsilon(1e-5));
    for (const ParamInfo& pi : mf.layout()) {
      INFO(pi.name);
      double gmax = 0, err = 0;
      for (int64_t i = pi.offset; i < pi.offset + pi.numel; ++i) {
        gmax = std::max(gmax, std::abs(md.grads()[i]));
        err = std::max(err, std::abs(double(mf.grads()[i]) - md.grads()[i]));
      }
      CHECK(err <= 2e-4 * gmax + 1e-9);
    }
    gpt::AdamParams a;
    a.lr = 1e-3;
    mf.update(a);
    md.update(a);
    // Adam's first step is lr · g / (|g| + eps): equal where |g| ≫ eps.
    for (int64_t i = 0; i < n; ++i)
      if (std::abs(md.grads()[i]) > 1e-5) REQUIRE(std::abs(double(mf.params()[i]) - md.params()[i]) < 1e-6);
  }
}

TEST_CASE("gpt: window attention is standard attention when the window spans the context, and only then",
          "[train][model]") {
  std::vector<int32_t> x, y;
  auto loss = [&](AttentionKind k, int64_t window) {
    GptConfig c = tiny_config(k, true);
    c.context = 9;
    c.window = window;
    tiny_batch(c, 2, x, y);
    Gpt<double> m(c, 2, 1);
    m.init(4);
    const auto s = m.step(x.data(), y.data(), false);
    return s.loss_sum / double(s.count);
  };
  const double standard = loss(AttentionKind::standard, 0);
  CHECK(loss(AttentionKind::window, 9) == Approx(standard).epsilon(1e-12));
  CHECK(loss(AttentionKind::window, 50) == Approx(standard).epsilon(1e-12));
  CHECK(std::abs(loss(AttentionKind::window, 8) - standard) > 1e-6);  // the first token drops out of the last row
  CHECK(std::abs(loss(AttentionKind::window, 1) - standard) > 1e-6);
  GptConfig bad = tiny_config(AttentionKind::window, true);
  bad.window = 0;
  CHECK_THROWS_AS(Gpt<float>(bad, 1, 1), InputError);
}

TEST_CASE("gpt: LayerScale with gains 1 is the plain block and every other block option changes the loss",
          "[train][model]") {
  std::vector<int32_t> x, y;
  auto loss = [&](const BlockOptions& o) {
    GptConfig c = tiny_config(AttentionKind::standard, true);
    c.layers = 3;
    c.block = o;
    tiny_batch(c, 2, x, y);
    Gpt<double> m(c, 2, 1);
    m.init(4);
    leave_zero_init(m);
    const auto s = m.step(x.data(), y.data(), false);
    return s.loss_sum / double(s.count);
  };
  const double plain = loss({});
  BlockOptions o;
  o.layer_scale = 1;
  CHECK(loss(o) == Approx(plain).epsilon(1e-14));
  o.layer_scale = 0.5;
  CHECK(std::abs(loss(o) - plain) > 1e-6);
  for (int which = 0; which < 4; ++which) {
    BlockOptions p;
    p.gate = which == 0;
    p.glu = which == 1;
    p.value_residual = which == 2 ? ValueResidual::learned : which == 3 ? ValueResidual::token : ValueResidual::none;
    INFO(options_name(p));
    CHECK(std::abs(loss(p) - plain) > 1e-6);
  }
  GptConfig bad = tiny_config(AttentionKind::selective, true);
  bad.block.value_residual = ValueResidual::learned;
  CHECK_THROWS_WITH(Gpt<float>(bad, 1, 1), Catch::Contains("value_residual needs standard or window attention"));
}

TEST_CASE("gpt: parameter counts and the arena", "[train][model]") {
  GptConfig c;  // the seed's: d 64, heads 2, layers 4, vocab 65
  CHECK(gpt_param_count(c) == 65 * 64 * 2 + 4 * (4 * 64 * 64 + 8 * 64 * 64 + 2 * 64));
  c.attention = AttentionKind::selective;
  CHECK(gpt_param_count(c) == 65 * 64 * 2 + 4 * (6 * 64 * 64 + 8 * 64 * 64 + 2 * 64));
  c.context = 16;
  Gpt<float> m(c, 2, 1);
  CHECK(m.arena_bytes() > size_t(4 * m.num_params()) * sizeof(float));
  // Block options: gate W_g (d, d), LayerScale 2 × d, GLU W_3 (4d, d) per block;
  // value residual per block after the first, H logits or W_m (H, d).
  c.attention = AttentionKind::standard;
  const int64_t plain = gpt_param_count(c);
  c.block = all_options(AttentionKind::standard, ValueResidual::learned);
  CHECK(gpt_param_count(c) == plain + 4 * (64 * 64 + 2 * 64 + 4 * 64 * 64) + 3 * 2);
  c.block.value_residual = ValueResidual::token;
  CHECK(gpt_param_count(c) == plain + 4 * (64 * 64 + 2 * 64 + 4 * 64 * 64) + 3 * 2 * 64);
}

TEST_CASE("gpt: a training step is deterministic for a seed and a thread count", "[train][model]") {
  GptConfig c = tiny_config(AttentionKind::standard, true);
  c.d = 16;
  c.context = 33;
  std::vector<int32_t> x, y;
  tiny_batch(c, 4, x, y);
  auto run = [&] {
    Gpt<float> m(c, 4, 2);
    m.init(9);
    std::vector<float> losses;
    for (int i = 1; i <= 3; ++i) {
      losses.push_back(float(m.step(x.data(), y.data(), true).loss_sum));
      gpt::AdamParams a;
      a.step = i;
      m.update(a);
    }
    return losses;
  };
  CHECK(run() == run());
}

TEST_CASE("train data: tokenizer round trip and unseen characters", "[train][data]") {
  const std::string text = "héllo wörld → ünïcode ✓ 🙂\nline two";
  std::vector<uint32_t> cps;
  REQUIRE(decode_utf8(text, cps, nullptr));
  const Tokenizer t = Tokenizer::from_text(cps);
  CHECK(t.chars[0] == 0);
  int64_t unk = -1;
  const auto ids = t.encode(cps, &unk);
  CHECK(unk == 0);
  CHECK(t.decode(ids) == text);
  CHECK(Tokenizer::from_vocabulary_utf8(t.vocabulary_utf8()).chars == t.chars);
  std::vector<uint32_t> other;
  REQUIRE(decode_utf8("hé?Z", other, nullptr));
  const auto ids2 = t.encode(other, &unk);
  CHECK(unk == 2);  // '?' and 'Z' never occur in the text
  CHECK(ids2[2] == 0);
  CHECK(ids2[3] == 0);
  CHECK(t.decode(ids2) == "hé\xEF\xBF\xBD\xEF\xBF\xBD");
  size_t bad = 0;
  CHECK_FALSE(decode_utf8("ok\xC3", cps, &bad));  // truncated sequence
  CHECK(bad == 2);
  CHECK_FALSE(decode_utf8("\xC0\xAF", cps, &bad));  // overlong
  CHECK_FALSE(decode_utf8("\xED\xA0\x80", cps, &bad));  // surrogate
  CHECK_FALSE(decode_utf8(std::string("a\0b", 3), cps, &bad));
}

TEST_CASE("train data: the held-out split maps unseen characters to the unknown id and counts them",
          "[train][data]") {
  const auto dir = temp_dir("split");
  std::string s(90, 'a');
  s += std::string(10, 'b');  // only in the held-out tenth
  write_file(dir / "t.txt", s);
  const TextData d = load_text((dir / "t.txt").string(), 0.1, 4);
  CHECK(d.train.size() == 90);
  CHECK(d.val.size() == 10);
  CHECK(d.tok.size() == 2);
  CHECK(d.val_unknown == 10);
  fs::remove_all(dir);
}

TEST_CASE("train data: bad data files are one-line errors naming the file", "[train][data][bad-input]") {
  const auto dir = temp_dir("bad");
  auto expect = [&](const std::string& name, const std::string& content, const std::string& what) {
    const std::string p = (dir / name).string();
    write_file(p, content);
    try {
      load_text(p, 0.1, 16);
      FAIL("no error for " << name);
    } catch (const InputError& e) {
      const std::string m = e.what();
      INFO(m);
      CHECK(m.find(p) != std::string::npos);
      CHECK(m.find(what) != std::string::npos);
      CHECK(m.find('\n') == std::string::npos);
    }
  };
  expect("empty.txt", "", "empty file");
  expect("binary.bin", std::string("PK\x03\x04\0\0\x01", 7) + std::string(400, 'x'), "binary");
  expect("latin1.txt", std::string(300, 'a') + "caf\xE9" + std::string(300, 'b'), "not UTF-8");
  expect("short.txt", std::string(100, 'a'), "shorter than one context window");
  // Through the command: exit 2, one line.
  write_file(dir / "s.json", R"({"kind": "train", "steps": 1, "context": 16, "batch": 1, "model": {"d": 8, "layers": 1}})");
  const auto r = test::run_attnbench("train " + (dir / "s.json").string() + " --data " + (dir / "empty.txt").string() +
                                     " --out " + (dir / "out").string());
  CHECK(r.code == 2);
  CHECK(r.text.find("empty.txt: empty file") != std::string::npos);
  CHECK(std::count(r.text.begin(), r.text.end(), '\n') == 1);
  CHECK_FALSE(fs::exists(dir / "out"));  // nothing written for bad input
  fs::remove_all(dir);
}

TEST_CASE("train data: MQAR batches ask keys that were given", "[train][data]") {
  MqarConfig m;
  m.pairs = 4;
  m.keys = 10;
  m.values = 6;
  Batch b;
  TrainRng rng(1, "t", "mqar");
  sample_mqar(b, m, 3, 21, rng);
  for (int64_t s = 0; s < 3; ++s) {
    const int32_t* x = b.x.data() + s * 21;
    const int32_t* y = b.y.data() + s * 21;
    for (int64_t t = 0; t < 8; ++t) CHECK(y[t] == -1);
    for (int64_t t = 8; t + 1 < 21; t += 2) {
      int64_t found = -1;
      for (int64_t i = 0; i < 4; ++i)
        if (x[2 * i] == x[t]) found = i;
      REQUIRE(found >= 0);
      CHECK(y[t] == x[2 * found + 1]);
      CHECK(x[t + 1] == y[t]);
      CHECK(y[t + 1] == -1);
    }
    CHECK(x[20] == 0);  // the odd last position is padding
  }
}

TEST_CASE("train suite: validation with did-you-mean", "[train][suite][bad-input]") {
  auto err = [](const std::string& text) {
    try {
      parse_train_suite(json::parse(text), "s.json");
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(err(R"({"stpes": 3})") == "s.json: unknown key 'stpes' (did you mean 'steps'?)");
  CHECK(err(R"({"model": {"layer": 3}})") == "s.json.model: unknown key 'layer' (did you mean 'layers'?)");
  CHECK(err(R"({"attention": ["selectiv"]})").find("unknown attention kind 'selectiv'") != std::string::npos);
  CHECK(err(R"({"attention": ["selectiv"]})").find("did you mean 'selective'") != std::string::npos);
  CHECK(err(R"({"data": {"kind": "txt"}})").find("did you mean 'text'") != std::string::npos);
  CHECK(err(R"({"lr": -1})").find("s.json.lr: expected a number") != std::string::npos);
  CHECK(err(R"({"model": {"d": 10, "heads": 4}})").find("heads: expected a divisor of d") != std::string::npos);
  CHECK(err(R"({"seeds": [1, 1]})").find("seed repeated") != std::string::npos);
  CHECK(err(R"({"model": {"window": 0}})").find("s.json.model.window") != std::string::npos);
  CHECK(err(R"({"attention": ["windw"]})").find("did you mean 'window'") != std::string::npos);
  CHECK(err(R"({"model": {"value_residual": "tokn"}})").find("did you mean 'token'") != std::string::npos);
  CHECK(err(R"({"model": {"value_residual": "learned"}, "attention": ["standard", "selective"]})")
            .find("s.json.model.value_residual: needs standard or window attention") != std::string::npos);
  CHECK(err(R"({"model": {"layer_scale": -0.1}})").find("s.json.model.layer_scale") != std::string::npos);
  CHECK(err(R"({"model": {"gate": 1}})").find("s.json.model.gate") != std::string::npos);
  CHECK(err(R"({"steps": 3})") == "no error");
  CHECK(err(R"({"model": {"gate": true, "value_residual": "token", "layer_scale": 0.1, "glu": true},
                "attention": ["standard", "window"]})") == "no error");
}

namespace {

json tiny_suite(const std::string& attention, int64_t steps) {
  return json{{"kind", "train"},
              {"data", {{"kind", "mqar"}, {"pairs", 3}, {"keys", 8}, {"values", 8}}},
              {"model", {{"d", 16}, {"heads", 2}, {"layers", 2}, {"rope", true}}},
              {"attention", {attention}},
              {"seeds", {7}},
              {"steps", steps},
              {"batch", 4},
              {"context", 24},
              {"lr", 3e-3},
              {"eval_interval", 3},
              {"eval_batches", 2},
              {"threads", 2}};
}

std::vector<std::string> losses_of(const fs::path& log) {
  std::vector<std::string> out;
  std::ifstream f(log);
  std::string line;
  while (std::getline(f, line)) {
    const json j = json::parse(line);
    out.push_back(std::to_string(j["step"].get<int64_t>()) + ":" + j["loss"].dump() +
                  (j.contains("eval_loss") ? " eval " + j["eval_loss"].dump() : ""));
  }
  return out;
}

}  // namespace

TEST_CASE("train: resume after an interruption continues bit-identically", "[train][resume]") {
  for (const std::string kind : {"standard", "selective", "window"}) {
    INFO(kind);
    const auto dir = temp_dir("resume_" + kind);
    json sj = tiny_suite(kind, 7);
    if (kind == "window")  // and every block option: their weights and moments go through the checkpoint too
      sj["model"].update(
          {{"window", 5}, {"gate", true}, {"value_residual", "token"}, {"layer_scale", 0.1}, {"glu", true}});
    const TrainSuite s = parse_train_suite(sj, (dir / "s.json").string());
    TrainOptions a;
    a.out_dir = (dir / "a").string();
    a.quiet = true;
    REQUIRE(run_train_suite(s, a) == 0);
    TrainOptions b = a;
    b.out_dir = (dir / "b").string();
    b.stop_after = 4;
    REQUIRE(run_train_suite(s, b) == 130);
    const std::string ck = (dir / "b" / (kind + "-seed7.safetensors")).string();
    REQUIRE(fs::exists(ck));
    // Without --resume an existing checkpoint is not overwritten.
    b.stop_after = -1;
    CHECK_THROWS_WITH(run_train_suite(s, b), Catch::Contains("pass --resume"));
    // A checkpoint of another configuration is rejected, naming the field.
    TrainSuite other = s;
    other.lr = 1e-3;
    TrainOptions br = b;
    br.resume = true;
    CHECK_THROWS_WITH(run_train_suite(other, br), Catch::Contains("field 'lr'"));
    // Simulate a kill after the checkpoint: a logged step past it is dropped on resume.
    { std::ofstream(dir / "b" / (kind + "-seed7.jsonl"), std::ios::app) << R"({"step": 5, "loss": 0})" << "\n"; }
    REQUIRE(run_train_suite(s, br) == 0);
    const auto la = losses_of(dir / "a" / (kind + "-seed7.jsonl"));
    const auto lb = losses_of(dir / "b" / (kind + "-seed7.jsonl"));
    CHECK(la.size() == 7);
    CHECK(la == lb);
    const json ra = json::parse(read_file(dir / "a" / "train.json"));
    const json rb = json::parse(read_file(dir / "b" / "train.json"));
    CHECK(ra["runs"][0]["eval_loss"] == rb["runs"][0]["eval_loss"]);
    CHECK(ra["table"][0]["params"] == ra["runs"][0]["params"]);
    fs::remove_all(dir);
  }
}

TEST_CASE("train: text data, the results table and sampling", "[train][cli]") {
  const auto dir = temp_dir("text");
  std::string text;
  for (int i = 0; i < 40; ++i) text += "To be, or not to be: that is the question. ";
  write_file(dir / "t.txt", text);
  json s = tiny_suite("standard", 4);
  s["data"] = {{"kind", "text"}, {"path", "t.txt"}};
  s["model"].update(
      {{"gate", true}, {"layer_scale", 0.1}, {"glu", true}});  // sampling rebuilds them from the checkpoint
  s["seeds"] = {1, 2};
  s["attention"] = {"standard", "selective"};
  write_file(dir / "s.json", s.dump());
  const auto r = test::run_attnbench("train " + (dir / "s.json").string() + " --out " + (dir / "out").string());
  INFO(r.text);
  REQUIRE(r.code == 0);
  CHECK(r.text.find("tokens/s") != std::string::npos);
  CHECK(r.text.find("ETA") != std::string::npos);
  const json res = json::parse(read_file(dir / "out" / "train.json"));
  REQUIRE(res["table"].size() == 2);
  CHECK(res["table"][0]["seeds"] == 2);
  CHECK(res["table"][0]["eval_loss"]["ci95"].get<double>() >= 0);
  CHECK(res["runs"].size() == 4);
  const auto smp = test::run_attnbench("sample " + (dir / "out" / "selective-seed2.safetensors").string() +
                                       " --prompt 'To be' --length 20 --seed 3");
  CHECK(smp.code == 0);
  CHECK(smp.text.rfind("To be", 0) == 0);
  // gpt-steps on a fixed batch (the PyTorch parity test's other half): losses fall on it; bad batches are one line.
  const std::string ck = (dir / "out" / "standard-seed1.safetensors").string();
  json batch{{"tokens", json::array()}, {"targets", json::array()}};
  for (int r = 0; r < 2; ++r) {
    json tr = json::array(), yr = json::array();
    for (int t = 0; t < 24; ++t) tr.push_back((r + t) % 5), yr.push_back(t == 0 ? -1 : (r + t + 1) % 5);
    batch["tokens"].push_back(tr), batch["targets"].push_back(yr);
  }
  write_file(dir / "b.json", batch.dump());
  const auto st = test::run_attnbench("gpt-steps " + ck + " --batch " + (dir / "b.json").string() +
                                      " --steps 4 --out " + (dir / "steps.safetensors").string());
  INFO(st.text);
  REQUIRE(st.code == 0);
  const SafetensorsFile sf = read_safetensors((dir / "steps.safetensors").string());
  const Tensor& losses = sf.tensors.at("losses");
  REQUIRE(losses.numel() == 4);
  CHECK(losses.data<double>()[3] < losses.data<double>()[0]);
  CHECK(sf.tensors.at("logits").shape()[0] == 48);
  CHECK(sf.tensors.count("grad.l1.wg") == 1);
  batch["targets"][1][3] = 999;
  write_file(dir / "b.json", batch.dump());
  const auto bb = test::run_attnbench("gpt-steps " + ck + " --batch " + (dir / "b.json").string() + " --out " +
                                      (dir / "x.safetensors").string());
  CHECK(bb.code == 2);
  CHECK(bb.text.find("b.json.targets[1]: expected ids in [-1, ") != std::string::npos);
  CHECK(!fs::exists(dir / "x.safetensors"));
  // A corrupt checkpoint: one line, exit 2.
  write_file(dir / "bad.safetensors", "garbage");
  const auto bad = test::run_attnbench("sample " + (dir / "bad.safetensors").string());
  CHECK(bad.code == 2);
  CHECK(bad.text.find("bad.safetensors") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("train: Ctrl-C saves a checkpoint and exits 130, and --resume continues", "[train][cli]") {
  const auto dir = temp_dir("sigint");
  json s = tiny_suite("standard", 100000000);
  s["eval_interval"] = 100000;
  write_file(dir / "s.json", s.dump());
  const std::string args = " train " + (dir / "s.json").string() + " --out " + (dir / "out").string() + " --quiet";
  const int status = std::system(("timeout --preserve-status -s INT 2 " + std::string(ATTNBENCH_BINARY) + args +
                                  " > /dev/null 2>&1").c_str());
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 130);
  CHECK(fs::exists(dir / "out" / "standard-seed7.safetensors"));
  const size_t logged = losses_of(dir / "out" / "standard-seed7.jsonl").size();
  CHECK(logged >= 1);
  // Another interruption after --resume: the log grows from the checkpoint on.
  const int again = std::system(("timeout --preserve-status -s INT 2 " + std::string(ATTNBENCH_BINARY) + args +
                                 " --resume > /dev/null 2>&1").c_str());
  CHECK(WEXITSTATUS(again) == 130);
  CHECK(losses_of(dir / "out" / "standard-seed7.jsonl").size() > logged);
  fs::remove_all(dir);
}
