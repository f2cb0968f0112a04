// SimHash codes on the CPU (the CPU path of magicpig.lsh.hash_codes; on a GPU the Triton
// kernel magicpig/kernels/simhash.py does the same).
#pragma once

#include <cstdint>

namespace magicpig {

// For each of H heads: n rows of d floats (x + h * n * d) against that head's projection
// [d][K*L] (proj + h * d * K * L) -> codes [H][n][L], bit k of code l = [x . proj[:, l*K+k] > 0].
// Rows are split over num_threads OpenMP threads (0: OpenMP's default). The scalars are checked
// (check_simhash_args); the caller guarantees the buffer sizes (bindings.cpp checks them).
void simhash_codes(const float* x, int H, int64_t n, int d, const float* proj, int K, int L, int32_t* codes,
                   int num_threads);

// invalid_argument unless H >= 1, n >= 0, d >= 1, K in [1, kMaxK], L in [1, kMaxL] and
// num_threads in [0, max_threads()].
void check_simhash_args(int H, int64_t n, int d, int K, int L, int num_threads);

}  // namespace magicpig
