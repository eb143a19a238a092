// Host-side CUDA plumbing shared by every CUDA implementation: a tracking
// device allocator, uploads/downloads of TensorMaps, and an Instance that times
// its launch with CUDA events. Compiled only when ATTNBENCH_HAVE_CUDA is 1.
#pragma once

#if ATTNBENCH_HAVE_CUDA

#include <cuda_runtime.h>

#include <map>
#include <string>

#include "harness/variant.hpp"

namespace attnbench {

/// Throws std::runtime_error with the CUDA error string and the call site.
void cuda_check(cudaError_t e, const char* what, const char* file, int line);
#define ATTNBENCH_CUDA_CHECK(call) ::attnbench::cuda_check((call), #call, __FILE__, __LINE__)

/// Device copies of a TensorMap (same names, dtypes and shapes).
class DeviceTensors {
 public:
  DeviceTensors() = default;
  DeviceTensors(const DeviceTensors&) = delete;
  DeviceTensors& operator=(const DeviceTensors&) = delete;
  ~DeviceTensors();
  void upload(const TensorMap& host);      // allocates and copies
  void allocate_like(const TensorMap& host);  // allocates only
  void download(TensorMap& host) const;    // copies back into same-named tensors
  void* get(const std::string& name) const;  // throws if absent
  template <class T>
  T* ptr(const std::string& name) const {
    return static_cast<T*>(get(name));
  }
  size_t bytes() const { return bytes_; }

 private:
  std::map<std::string, void*> ptrs_;
  size_t bytes_ = 0;
};

/// Uploads the inputs at construction, runs launch() between two events after
/// flushing the L2 cache (cold timing, DESIGN §4).
class CudaInstance : public Instance {
 public:
  explicit CudaInstance(const ImplArgs& args);
  ~CudaInstance() override;
  void run() override;
  void finish() override { out_.download(outputs_); }
  double device_seconds() const override { return last_seconds_; }
  size_t device_bytes() const override { return in_.bytes() + out_.bytes() + scratch_bytes_; }

 protected:
  /// Enqueues the kernels on `stream`.
  virtual void launch(cudaStream_t stream) = 0;
  /// Device scratch owned by the instance, counted in device_bytes().
  void* scratch(size_t bytes);

  DeviceTensors in_, out_;

 private:
  TensorMap& outputs_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  void* flush_ = nullptr;  // twice the L2 size, rewritten before each timed launch
  size_t flush_bytes_ = 0;
  unsigned flush_value_ = 0;
  double last_seconds_ = -1.0;
};

}  // namespace attnbench

#endif  // ATTNBENCH_HAVE_CUDA
