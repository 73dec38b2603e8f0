// The per-call scratch memory of the kernels: one byte tensor, flags first.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

namespace modan_ext {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Workspace: [0, 256) flags (int flag, unsigned cmax), then the per-row records / buffers.
constexpr int64_t kWsHead = 256;

struct Workspace {
  Tensor buf;
  unsigned char* base;
  int* flag() const { return reinterpret_cast<int*>(base); }
  unsigned* cmax() const { return reinterpret_cast<unsigned*>(base + 4); }
  void* body() const { return base + kWsHead; }
};

Workspace make_workspace(const Tensor& like, int64_t body_bytes, cudaStream_t stream) {
  Workspace ws{torch::stable::new_empty(like, {kWsHead + body_bytes}, ScalarType::Byte), nullptr};
  ws.base = static_cast<unsigned char*>(ws.buf.mutable_data_ptr());
  STD_CUDA_CHECK(cudaMemsetAsync(ws.base, 0, kWsHead, stream));
  return ws;
}

}  // namespace cuda_impl
}  // namespace modan_ext
