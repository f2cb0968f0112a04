// A minimal SIMD layer for the kernels: one vector of W floats at the level this translation
// unit is compiled for (AVX-512: 16, AVX2: 8, baseline: 1), with loads that expand bf16 and
// fp16 to fp32 in registers. Included only from kernels_impl.h. Everything lives in the
// namespace MAGICPIG_ISA_NS, so the differently compiled copies of these inline functions never
// merge at link time (one definition per instruction set).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace MAGICPIG_ISA_NS {
namespace simd {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IEEE half -> float without F16C (normal, subnormal, inf and nan).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {
    bits = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
  } else if (em >= 0x0400u) {
    bits = sign | ((em << 13) + ((127u - 15u) << 23));
  } else {
    float f = static_cast<float>(em) * 5.9604644775390625e-08f;  // em * 2^-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512F__)
constexpr int W = 16;
using vf = __m512;
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline float reduce_add(vf x) { return _mm512_reduce_add_ps(x); }
// Bit i set when lane i is > 0 (false for NaN, like torch's x > 0).
inline uint32_t positive_mask(vf x) { return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ); }
inline vf load_bf16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline vf load_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__)
constexpr int W = 8;
using vf = __m256;
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline float reduce_add(vf x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline uint32_t positive_mask(vf x) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ)));
}
inline vf load_bf16(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline vf load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#else
constexpr int W = 1;
using vf = float;
inline vf zero() { return 0.0f; }
inline vf set1(float x) { return x; }
inline vf load(const float* p) { return *p; }
inline void store(float* p, vf x) { *p = x; }
inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }
inline vf mul(vf a, vf b) { return a * b; }
inline float reduce_add(vf x) { return x; }
inline uint32_t positive_mask(vf x) { return x > 0.0f ? 1u : 0u; }
inline vf load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
inline vf load_f16(const uint16_t* p) { return f16_to_f32(*p); }
#endif

}  // namespace simd
}  // namespace MAGICPIG_ISA_NS
