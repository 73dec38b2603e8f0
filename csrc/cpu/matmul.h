// Matrix products of the CPU kernel through ATen's mm (MKL / OpenBLAS), called via the stable
// ABI's dispatcher on strided views of raw memory.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <cstdint>
#include <type_traits>

namespace modan_ext {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

template <typename T>
constexpr ScalarType scalar_type_of() {
  return std::is_same_v<T, float> ? ScalarType::Float : ScalarType::Double;
}

template <typename T>
Tensor blob(const T* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return torch::stable::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride},
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  scalar_type_of<T>());
}

// out = a @ b, all strided views of raw memory; `out` is preallocated.
void matmul_into(const Tensor& out, const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a),
                                    torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STD_TORCH_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION) ==
                      AOTI_TORCH_SUCCESS,
                  "modan_ext: aten::mm.out failed");
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // drop the returned alias of `out`
}

}  // namespace
}  // namespace modan_ext
