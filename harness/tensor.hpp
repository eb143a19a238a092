// Host tensors: an aligned byte buffer with a dtype and a row-major shape.
//
// The harness keeps every problem's master copy in f64 and casts it to the
// dtype under test; implementations read typed pointers (`data<float>()`).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "harness/dtype.hpp"

namespace attnbench {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[2, 3, 4]"

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape);  // zero-initialized, 64-byte aligned
  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  size_t rank() const { return shape_.size(); }
  int64_t numel() const { return attnbench::numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* raw() { return data_.get(); }
  const void* raw() const { return data_.get(); }
  template <class T>
  T* data() {
    return static_cast<T*>(raw());
  }
  template <class T>
  const T* data() const {
    return static_cast<const T*>(raw());
  }

  /// Element i converted to double (any dtype).
  double get(int64_t i) const;
  /// Stores x at element i, rounding to the dtype.
  void set(int64_t i, double x);

  /// A copy converted (rounded) to `t`.
  Tensor to(DType t) const;
  /// Every element as double.
  std::vector<double> to_f64_vector() const;
  /// A tensor of `dtype` holding x (numel(shape) values) rounded to it: the inverse of
  /// to_f64_vector, for references that compute in double.
  static Tensor from_f64(const std::vector<double>& x, DType dtype, Shape shape);
  /// Fills floating tensors with NaN (before a checked call: stale data cannot pass).
  void fill_nan();
  /// FNV-1a hash of the bytes (inputs must be unchanged by a call).
  uint64_t hash() const;

 private:
  struct Free {
    size_t bytes;  // as allocated (the memory limit counts them); no initializer: unique_ptr needs it default-constructible here
    void operator()(void* p) const;
  };
  DType dtype_ = DType::f32;
  Shape shape_;
  std::unique_ptr<void, Free> data_;
};

/// Named tensors (inputs, weights, outputs), ordered by name.
using TensorMap = std::map<std::string, Tensor>;

/// The tensor `name` or an InputError naming `where` and the missing tensor.
const Tensor& require(const TensorMap& m, const std::string& name, const std::string& where);
/// The shape of tensor `name`, or an InputError when it is missing or not of rank `rank`.
const Shape& require_rank(const TensorMap& m, const std::string& name, size_t rank, const std::string& where);
/// Tensor `name`, or an InputError when it is missing or its shape is not `shape`.
const Tensor& require_shape(const TensorMap& m, const std::string& name, const Shape& shape, const std::string& where);
/// The data of tensor `name` stored as `dtype` (a kernel's precondition: std::invalid_argument otherwise).
const void* require_dtype(const TensorMap& m, const std::string& name, DType dtype, const std::string& where);
inline const float* require_f32(const TensorMap& m, const std::string& name, const std::string& where) {
  return static_cast<const float*>(require_dtype(m, name, DType::f32, where));
}

}  // namespace attnbench
