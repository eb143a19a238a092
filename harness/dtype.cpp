#include "harness/dtype.hpp"

#include "harness/errors.hpp"

namespace attnbench {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::bf16: case DType::f16: return 2;
    case DType::u8: case DType::boolean: return 1;
  }
  return 0;
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f64: return "f64";
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i64: return "i64";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
    case DType::boolean: return "bool";
  }
  return "?";
}

bool is_floating(DType t) {
  return t == DType::f64 || t == DType::f32 || t == DType::bf16 || t == DType::f16;
}

double dtype_eps(DType t) {
  switch (t) {
    case DType::f64: return 0x1.0p-53;
    case DType::f32: return 0x1.0p-24;
    case DType::bf16: return 0x1.0p-8;
    case DType::f16: return 0x1.0p-11;
    default: return 0.0;
  }
}

DType parse_dtype(std::string_view s, std::string_view where) {
  static const std::vector<std::string> names{"f64", "f32", "bf16", "f16"};
  for (DType t : {DType::f64, DType::f32, DType::bf16, DType::f16})
    if (s == dtype_name(t)) return t;
  throw InputError(std::string(where) + ": unknown dtype '" + std::string(s) +
                   "', expected one of f64, f32, bf16, f16" + did_you_mean(s, names));
}

}  // namespace attnbench
