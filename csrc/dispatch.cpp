#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace mp_scalar { const magicpig::Kernels& kernels(); }
namespace mp_avx2 { const magicpig::Kernels& kernels(); }
namespace mp_avx512 { const magicpig::Kernels& kernels(); }

namespace magicpig {

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512: return "avx512";
    case SimdLevel::avx2: return "avx2";
    default: return "scalar";
  }
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name == "avx512") return SimdLevel::avx512;
  if (name == "avx2") return SimdLevel::avx2;
  if (name == "scalar") return SimdLevel::scalar;
  throw std::invalid_argument("SIMD level '" + name + "': expected one of avx512, avx2, scalar");
}

SimdLevel best_supported_simd_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return SimdLevel::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return SimdLevel::avx2;
  return SimdLevel::scalar;
}

namespace {

// The level from MAGICPIG_SIMD (never above what the CPU supports), read once at first use.
SimdLevel initial_level() {
  SimdLevel best = best_supported_simd_level();
  const char* env = std::getenv("MAGICPIG_SIMD");
  if (env == nullptr || *env == '\0') return best;
  SimdLevel wanted = parse_simd_level(env);
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::atomic<int>& level_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_level())};
  return slot;
}

}  // namespace

SimdLevel active_simd_level() { return static_cast<SimdLevel>(level_slot().load()); }

void set_simd_level(SimdLevel level) {
  if (static_cast<int>(level) > static_cast<int>(best_supported_simd_level()))
    throw std::invalid_argument(std::string("SIMD level '") + simd_level_name(level) +
                                "' is not supported by this CPU (best: " +
                                simd_level_name(best_supported_simd_level()) + ")");
  level_slot().store(static_cast<int>(level));
}

const Kernels& active_kernels() {
  switch (active_simd_level()) {
    case SimdLevel::avx512: return mp_avx512::kernels();
    case SimdLevel::avx2: return mp_avx2::kernels();
    default: return mp_scalar::kernels();
  }
}

}  // namespace magicpig
