// Small helpers shared by the CPU kernels: element conversion and storage tags. (Threads: see
// csrc/cpu/thread_pool.cpp.)
#pragma once
#include <cstdint>
#include <cstring>

namespace vqk {

// IEEE half <-> float by bit manipulation (no compiler extensions needed).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (absx < 0x38800000u) {  // result is subnormal or zero
    float a;
    std::memcpy(&a, &absx, 4);
    // 2^-24 is the smallest half subnormal; scale so rounding happens in float's integer part.
    const float scaled = a * 16777216.0f;  // a / 2^-24
    uint32_t m = (uint32_t)scaled;
    const float rem = scaled - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return (uint16_t)(sign | m);
  }
  uint32_t e = ((absx >> 23) - 127 + 15), mant = absx & 0x7fffffu;
  uint32_t h = (e << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: fine
  return (uint16_t)(sign | h);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

// Storage tags: how an element of each DType is read and written in its accumulation type.
struct F32 { using store = float; using acc = float;
  static float load(const float* p) { return *p; } static void put(float* p, float v) { *p = v; } };
struct F64 { using store = double; using acc = double;
  static double load(const double* p) { return *p; } static void put(double* p, double v) { *p = v; } };
struct F16 { using store = uint16_t; using acc = float;
  static float load(const uint16_t* p) { return half_to_float(*p); }
  static void put(uint16_t* p, float v) { *p = float_to_half(v); } };
struct BF16 { using store = uint16_t; using acc = float;
  static float load(const uint16_t* p) { return bf16_to_float(*p); }
  static void put(uint16_t* p, float v) { *p = float_to_bf16(v); } };

}  // namespace vqk
