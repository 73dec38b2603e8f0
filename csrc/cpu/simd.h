// 64-byte SIMD vectors through GCC/Clang vector extensions: AVX-512 in the x86-64-v4 clone of a
// function, two AVX2 halves in the v3 clone, SSE in the baseline. Plain loops over the tile did
// not vectorise (min/max and exp defeat GCC's if-conversion), so the hot loops say it explicitly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace modan_ext::simd {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = float __attribute__((vector_size(64)));
  using mask = int32_t __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <>
struct Vec<double> {
  using type = double __attribute__((vector_size(64)));
  using mask = int64_t __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};
template <typename T>
using vec_t = typename Vec<T>::type;
template <typename T>
constexpr int lanes = Vec<T>::lanes;

#define MODAN_INLINE inline __attribute__((always_inline))

// The hot per-tile loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time: one portable build runs vectorised on any x86-64.
#if defined(__x86_64__) && !defined(__clang__)
#define MODAN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MODAN_CLONES
#endif

template <typename T>
MODAN_INLINE vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
MODAN_INLINE void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
MODAN_INLINE vec_t<T> splat(T x) {
  return vec_t<T>{} + x;
}
template <typename V>
MODAN_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
MODAN_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}
template <typename T>
MODAN_INLINE T hsum(vec_t<T> v) {
  T s = 0;
  for (int l = 0; l < lanes<T>; ++l) s += v[l];
  return s;
}
template <typename T>
MODAN_INLINE T hmax(vec_t<T> v) {
  T m = v[0];
  for (int l = 1; l < lanes<T>; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp(x) for x <= 0 as used here (x - max): Cephes' expf polynomial, ~1 ulp. Inputs below -87
// give ~1e-38 instead of 0, which is negligible against the sum's largest term, 1.
MODAN_INLINE vec_t<float> exp(vec_t<float> x) {
  using V = vec_t<float>;
  x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto bits = (__builtin_convertvector(n, Vec<float>::mask) + 127) << 23;
  return p * reinterpret_cast<const V&>(bits);
}

// float64 is the exactness path (gradcheck, tests): libm's exp, lane by lane.
MODAN_INLINE vec_t<double> exp(vec_t<double> x) {
  vec_t<double> y;
  for (int l = 0; l < lanes<double>; ++l) y[l] = std::exp(x[l]);
  return y;
}

}  // namespace modan_ext::simd
