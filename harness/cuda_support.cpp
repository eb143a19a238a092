#include "harness/cuda_support.hpp"

#if ATTNBENCH_HAVE_CUDA

#include <algorithm>
#include <stdexcept>

namespace attnbench {

void cuda_check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + ": " + cudaGetErrorString(e));
}

DeviceTensors::~DeviceTensors() {
  for (auto& [name, p] : ptrs_) cudaFree(p);
}

void DeviceTensors::allocate_like(const TensorMap& host) {
  for (const auto& [name, t] : host) {
    void* p = nullptr;
    ATTNBENCH_CUDA_CHECK(cudaMalloc(&p, t.nbytes() ? t.nbytes() : 1));
    ptrs_[name] = p;
    bytes_ += t.nbytes();
  }
}

void DeviceTensors::upload(const TensorMap& host) {
  allocate_like(host);
  for (const auto& [name, t] : host)
    ATTNBENCH_CUDA_CHECK(cudaMemcpy(ptrs_.at(name), t.raw(), t.nbytes(), cudaMemcpyHostToDevice));
}

void DeviceTensors::download(TensorMap& host) const {
  for (auto& [name, t] : host) ATTNBENCH_CUDA_CHECK(cudaMemcpy(t.raw(), get(name), t.nbytes(), cudaMemcpyDeviceToHost));
}

void* DeviceTensors::get(const std::string& name) const {
  auto it = ptrs_.find(name);
  if (it == ptrs_.end()) throw std::runtime_error("no device tensor '" + name + "'");
  return it->second;
}

CudaInstance::CudaInstance(const ImplArgs& args) : outputs_(args.outputs) {
  in_.upload(args.inputs);
  out_.allocate_like(args.outputs);
  ATTNBENCH_CUDA_CHECK(cudaStreamCreate(&stream_));
  ATTNBENCH_CUDA_CHECK(cudaEventCreate(&start_));
  ATTNBENCH_CUDA_CHECK(cudaEventCreate(&stop_));
}

CudaInstance::~CudaInstance() {
  cudaEventDestroy(start_);
  cudaEventDestroy(stop_);
  cudaStreamDestroy(stream_);
  cudaFree(scratch_);
  cudaFree(flush_);
}

void* CudaInstance::scratch(size_t bytes) {
  if (bytes > scratch_bytes_) {
    cudaFree(scratch_);
    scratch_ = nullptr;
    ATTNBENCH_CUDA_CHECK(cudaMalloc(&scratch_, bytes));
    scratch_bytes_ = bytes;
  }
  return scratch_;
}

void CudaInstance::run() {
  // Cold-cache timing: overwrite an L2-sized buffer before every sample.
  if (!flush_) {
    int device = 0, l2 = 0;
    ATTNBENCH_CUDA_CHECK(cudaGetDevice(&device));
    ATTNBENCH_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    flush_bytes_ = size_t(std::max(l2, 1)) * 2;
    ATTNBENCH_CUDA_CHECK(cudaMalloc(&flush_, flush_bytes_));
  }
  ATTNBENCH_CUDA_CHECK(cudaMemsetAsync(flush_, int(++flush_value_ & 0xff), flush_bytes_, stream_));
  ATTNBENCH_CUDA_CHECK(cudaEventRecord(start_, stream_));
  launch(stream_);
  ATTNBENCH_CUDA_CHECK(cudaGetLastError());
  ATTNBENCH_CUDA_CHECK(cudaEventRecord(stop_, stream_));
  ATTNBENCH_CUDA_CHECK(cudaEventSynchronize(stop_));
  float ms = 0;
  ATTNBENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
  last_seconds_ = ms * 1e-3;
}

}  // namespace attnbench

#endif  // ATTNBENCH_HAVE_CUDA
