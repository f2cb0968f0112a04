// Argument checks shared by the entry points of the extension.
//
// magicpig._C may be called directly, not only through the validated Python wrappers
// (magicpig/store, magicpig/lsh), so every entry point checks its scalars here and throws
// std::invalid_argument (ValueError in Python) instead of crashing the process. Header-only:
// the build lists its sources explicitly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

namespace magicpig {

// The most OpenMP threads an entry point accepts: 4 x the cores, as in
// magicpig.config.max_cpu_threads(). Asked for tens of thousands, libgomp aborts the process
// ("Thread creation failed") or crashes instead of failing the call.
inline int max_threads() {
  return 4 * static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// "where: name=value: expected an integer in [lo, hi]" unless lo <= value <= hi.
inline void check_range(const char* where, const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return;
  std::string allowed = hi == std::numeric_limits<int64_t>::max()
                            ? "an integer >= " + std::to_string(lo)
                            : "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  throw std::invalid_argument(std::string(where) + ": " + name + "=" + std::to_string(value) + ": expected " +
                              allowed);
}

inline void check_threads(const char* where, int num_threads) {
  check_range(where, "num_threads", num_threads, 0, max_threads());  // 0: OpenMP's default
}

// The product of sizes, or invalid_argument when one is negative or it overflows int64 (a huge
// size must not wrap around into a small one that a buffer check would then accept).
inline int64_t checked_product(const char* name, std::initializer_list<int64_t> sizes) {
  int64_t p = 1;
  for (int64_t s : sizes)
    if (s < 0 || __builtin_mul_overflow(p, s, &p))
      throw std::invalid_argument(std::string(name) + ": negative size or element count overflowing int64");
  return p;
}

// Hash codes must lie in [0, 2^K): one OR over all of them (vectorises; a negative code sets the
// top bit), and a second pass only to name the first bad one.
inline void check_codes(const char* name, const int32_t* codes, int64_t count, int K) {
  uint32_t any = 0;
  for (int64_t i = 0; i < count; ++i) any |= static_cast<uint32_t>(codes[i]);
  if ((any >> K) == 0) return;
  for (int64_t i = 0; i < count; ++i)
    if (static_cast<uint32_t>(codes[i]) >> K)
      throw std::invalid_argument(std::string(name) + ": code " + std::to_string(codes[i]) + " at flat index " +
                                  std::to_string(i) + " is outside [0, 2^K = " + std::to_string(1L << K) + ")");
}

}  // namespace magicpig
