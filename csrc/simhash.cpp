#include "simhash.h"

#include <omp.h>

#include <limits>

#include "checks.h"
#include "dispatch.h"

namespace magicpig {

namespace {
constexpr int64_t kRowsPerTask = 64;  // 64 rows x 4,000 hyperplanes x d=64: 16M multiply-adds a task
}

void check_simhash_args(int H, int64_t n, int d, int K, int L, int num_threads) {
  const char* where = "simhash_codes";
  const int64_t any = std::numeric_limits<int64_t>::max();
  check_range(where, "H", H, 1, any);
  check_range(where, "n", n, 0, any);
  check_range(where, "d", d, 1, any);
  check_range(where, "K", K, 1, kMaxK);  // a code is one int32 field of K bits
  check_range(where, "L", L, 1, kMaxL);
  check_threads(where, num_threads);
}

void simhash_codes(const float* x, int H, int64_t n, int d, const float* proj, int K, int L, int32_t* codes,
                   int num_threads) {
  check_simhash_args(H, n, d, K, L, num_threads);
  const Kernels& kern = active_kernels();
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t per_head = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = H * per_head;
  const int64_t KL = static_cast<int64_t>(K) * L;
  // Below ~1M multiply-adds (a few query rows of a small model) a thread team costs more than
  // it saves; a decode step of Llama-3.1-8B (8 heads x 4 rows x 128 x 1500) is 6M.
  const bool parallel = tasks > 1 && nt > 1 && n * H * KL * d >= (int64_t{1} << 20);
#pragma omp parallel for num_threads(nt) schedule(dynamic) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t h = t / per_head, r0 = (t % per_head) * kRowsPerTask;
    const int64_t rows = n - r0 < kRowsPerTask ? n - r0 : kRowsPerTask;
    kern.simhash_codes(x + (h * n + r0) * d, rows, d, proj + h * d * KL, K, L, codes + (h * n + r0) * L);
  }
}

}  // namespace magicpig
