// Element types and host-side conversions.
//
// bf16 and f16 are stored as raw 16-bit patterns; conversions round to nearest
// even, like PyTorch and the CUDA intrinsics. The helpers are constexpr-free plain
// inline functions so that CUDA host code and CPU kernels can include this file.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace attnbench {

enum class DType : uint8_t { f64, f32, bf16, f16, i64, i32, u8, boolean };

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(bf16_t h) { return bits_to_float(uint32_t(h.bits) << 16); }

inline bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

inline float to_float(f16_t h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline f16_t to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // overflow → inf
  if (a < 0x38800000u) {
    // subnormal or zero: round a * 2^24 to an integer (nearest even)
    float v = bits_to_float(a) * 16777216.0f;
    uint32_t m = uint32_t(v);
    float rem = v - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return f16_t{uint16_t(sign | m)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
  return f16_t{uint16_t(sign | (r >> 13))};
}

/// Rounds a float to the nearest value representable in `t` (identity for f32/f64).
inline double round_to(DType t, double x) {
  switch (t) {
    case DType::f32: return double(float(x));
    case DType::bf16: return to_float(to_bf16(float(x)));
    case DType::f16: return to_float(to_f16(float(x)));
    default: return x;
  }
}

/// bf16 or f16: the storage dtypes the implementations widen to f32 as they read.
inline bool is_16bit(DType t) { return t == DType::bf16 || t == DType::f16; }

/// Element i of a buffer of f32, bf16 or f16 elements, as a float (the CPU
/// kernels' scalar loads of their 16-bit inputs; other dtypes are not read).
inline float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::bf16: return to_float(static_cast<const bf16_t*>(p)[i]);
    case DType::f16: return to_float(static_cast<const f16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // "f32", "bf16", ...
bool is_floating(DType t);
/// Unit roundoff (half an ulp at 1.0) of a floating dtype.
double dtype_eps(DType t);
/// Parses "f32", "bf16", ...; throws InputError naming `where` on failure.
DType parse_dtype(std::string_view s, std::string_view where);

}  // namespace attnbench
