// Run-time choice of the SIMD level of the hot kernels.
//
// kernels_impl.h is compiled once per level (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_scalar.cpp) into namespaces mp_avx512, mp_avx2, mp_scalar; each exposes the same
// Kernels table. active_kernels() returns the best level this CPU supports, lowered by the
// environment variable MAGICPIG_SIMD=avx512|avx2|scalar or by set_simd_level().
#pragma once

#include <string>

#include "kernels.h"

namespace magicpig {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };

const char* simd_level_name(SimdLevel level);
SimdLevel parse_simd_level(const std::string& name);  // throws std::invalid_argument
SimdLevel best_supported_simd_level();                // what this CPU can run
SimdLevel active_simd_level();
// Force a level (not above best_supported_simd_level(); throws std::invalid_argument).
void set_simd_level(SimdLevel level);
const Kernels& active_kernels();

}  // namespace magicpig
