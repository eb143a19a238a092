#include "harness/tensor.hpp"
#include "harness/workspace.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"

namespace attnbench {

int64_t numel(const Shape& s) {
  // Shapes come from users (suites, case files): a product past int64 is an
  // input error, not a wrapped size that later reads out of bounds.
  int64_t n = 1;
  for (int64_t d : s)
    if (__builtin_mul_overflow(n, d, &n)) throw InputError("shape " + shape_str(s) + " has more than 2^63 elements");
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void Tensor::Free::operator()(void* p) const { limited_free(p, bytes); }

Tensor::Tensor(DType dtype, Shape shape) : dtype_(dtype), shape_(std::move(shape)) {
  for (int64_t d : shape_)
    if (d < 0) throw std::invalid_argument("Tensor: negative dimension in " + shape_str(shape_));
  const int64_t n = numel();
  if (n > std::numeric_limits<int64_t>::max() / 64)
    throw InputError("shape " + shape_str(shape_) + " has too many elements to allocate");
  size_t bytes = (nbytes() + 63) / 64 * 64;
  void* p = limited_aligned_alloc(bytes);
  // Huge shapes are user input: say what could not be had instead of bad_alloc.
  if (!p)
    throw InputError("cannot allocate a " + std::string(dtype_name(dtype_)) + " tensor of shape " + shape_str(shape_) +
                     " (" + std::to_string(bytes >> 20) + " MiB)");
  std::memset(p, 0, bytes);
  data_ = std::unique_ptr<void, Free>(p, Free{bytes});
}

Tensor::Tensor(const Tensor& o) : Tensor(o.dtype_, o.shape_) {
  if (o.nbytes()) std::memcpy(raw(), o.raw(), o.nbytes());
}

Tensor& Tensor::operator=(const Tensor& o) {
  if (this != &o) *this = Tensor(o);
  return *this;
}

double Tensor::get(int64_t i) const {
  switch (dtype_) {
    case DType::f64: return data<double>()[i];
    case DType::f32: return data<float>()[i];
    case DType::bf16: return to_float(data<bf16_t>()[i]);
    case DType::f16: return to_float(data<f16_t>()[i]);
    case DType::i64: return double(data<int64_t>()[i]);
    case DType::i32: return data<int32_t>()[i];
    case DType::u8: case DType::boolean: return data<uint8_t>()[i];
  }
  return 0;
}

void Tensor::set(int64_t i, double x) {
  switch (dtype_) {
    case DType::f64: data<double>()[i] = x; break;
    case DType::f32: data<float>()[i] = float(x); break;
    case DType::bf16: data<bf16_t>()[i] = to_bf16(float(x)); break;
    case DType::f16: data<f16_t>()[i] = to_f16(float(x)); break;
    case DType::i64: data<int64_t>()[i] = int64_t(x); break;
    case DType::i32: data<int32_t>()[i] = int32_t(x); break;
    case DType::u8: data<uint8_t>()[i] = uint8_t(x); break;
    case DType::boolean: data<uint8_t>()[i] = x != 0; break;
  }
}

Tensor Tensor::to(DType t) const {
  if (t == dtype_) return *this;
  Tensor out(t, shape_);
  const int64_t n = numel();
  if (dtype_ == DType::f64 && t == DType::f32) {
    const double* s = data<double>();
    float* d = out.data<float>();
    for (int64_t i = 0; i < n; ++i) d[i] = float(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out.set(i, get(i));
  }
  return out;
}

std::vector<double> Tensor::to_f64_vector() const {
  std::vector<double> v(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) v[size_t(i)] = get(i);
  return v;
}

Tensor Tensor::from_f64(const std::vector<double>& x, DType dtype, Shape shape) {
  Tensor t(dtype, std::move(shape));
  if (size_t(t.numel()) != x.size())
    throw std::logic_error("Tensor::from_f64: " + std::to_string(x.size()) + " values for " +
                           std::to_string(t.numel()) + " elements");
  if (dtype == DType::f64) {
    std::copy(x.begin(), x.end(), t.data<double>());
  } else if (dtype == DType::f32) {
    for (size_t i = 0; i < x.size(); ++i) t.data<float>()[i] = float(x[i]);
  } else {
    for (size_t i = 0; i < x.size(); ++i) t.set(int64_t(i), x[i]);
  }
  return t;
}

void Tensor::fill_nan() {
  if (!is_floating(dtype_)) return;
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) set(i, std::numeric_limits<double>::quiet_NaN());
}

uint64_t Tensor::hash() const {
  const auto* p = static_cast<const unsigned char*>(raw());
  uint64_t h = 0xcbf29ce484222325ull;
  const size_t n = nbytes();
  size_t i = 0;
  // 8 bytes at a time: this runs on every input before and after each checked call.
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

const Tensor& require(const TensorMap& m, const std::string& name, const std::string& where) {
  auto it = m.find(name);
  if (it == m.end()) throw InputError(where + ": missing tensor '" + name + "'");
  return it->second;
}

const Shape& require_rank(const TensorMap& m, const std::string& name, size_t rank, const std::string& where) {
  const Tensor& t = require(m, name, where);
  if (t.rank() != rank)
    throw InputError(where + ": '" + name + "' has shape " + shape_str(t.shape()) + ", expected rank " +
                     std::to_string(rank));
  return t.shape();
}

const Tensor& require_shape(const TensorMap& m, const std::string& name, const Shape& shape, const std::string& where) {
  const Tensor& t = require(m, name, where);
  if (t.shape() != shape)
    throw InputError(where + ": '" + name + "' has shape " + shape_str(t.shape()) + ", expected " + shape_str(shape));
  return t;
}

const void* require_dtype(const TensorMap& m, const std::string& name, DType dtype, const std::string& where) {
  const Tensor& t = require(m, name, where);
  if (t.dtype() != dtype)
    throw std::invalid_argument(where + ": tensor '" + name + "' must be " + std::string(dtype_name(dtype)));
  return t.raw();
}

}  // namespace attnbench
