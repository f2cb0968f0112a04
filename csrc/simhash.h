// SimHash codes on the CPU (the CPU path of magicpig.lsh.hash_codes; on a GPU the Triton
// kernel magicpig/kernels/simhash.py does the same).
#pragma once

#include <cstdint>

namespace magicpig {

// For each of H heads: n rows of d floats (x + h * n * d) against that head's projection
// [d][K*L] (proj + h * d * K * L) -> codes [H][n][L], bit k of code l = [x . proj[:, l*K+k] > 0].
// Rows are split over num_threads OpenMP threads (<= 0: OpenMP's default). Arguments are
// validated by the caller (magicpig/lsh.py).
void simhash_codes(const float* x, int H, int64_t n, int d, const float* proj, int K, int L, int32_t* codes,
                   int num_threads);

}  // namespace magicpig
