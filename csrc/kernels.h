// The ISA-independent interface of the hot kernels (one table per SIMD level, see dispatch.h).
#pragma once

#include <cstdint>

namespace magicpig {

enum class KvDtype : int { bf16 = 0, fp16 = 1, fp32 = 2 };

inline int kv_itemsize(KvDtype t) { return t == KvDtype::fp32 ? 4 : 2; }

// One block of up to 65535 consecutive middle tokens of one (sequence, KV head).
// Tokens [0, csr_len) are indexed by per-table bucket lists (CSR); tokens [csr_len, len) are a
// short unsorted tail whose codes are scanned directly (recent appends, merged in batches).
// The attending sequence sees tokens [0, visible) only: a block shared with the sequence it was
// forked from may hold more (the CSR may list them; the kernel drops them).
struct BlockView {
  int32_t len = 0;
  int32_t visible = 0;  // <= len
  int32_t csr_len = 0;
  // K and V rows are interleaved, [len][2][d] of the store's kv dtype, so one candidate's
  // key and value are 2*d*itemsize contiguous bytes (one DRAM page, adjacent cache lines).
  const void* keys = nullptr;           // row i at keys + i * row_stride bytes
  const void* values = nullptr;         // row i at values + i * row_stride bytes
  int64_t row_stride = 0;               // bytes between consecutive tokens
  const float* norms = nullptr;         // [len] |k_i| in fp32 (from the stored, rounded keys)
  const uint16_t* offsets = nullptr;    // [L][nbuckets + 1], bucket = code & (nbuckets - 1)
  const uint16_t* ids = nullptr;        // [L][csr_len], ascending within a bucket
  const uint8_t* hi = nullptr;          // [L][csr_len] code >> low_bits, or null when K <= low_bits
  const int32_t* tail_codes = nullptr;  // [len - csr_len][L]
};

// The query heads of one GQA group (at most kMaxGroup; larger groups are split by the caller).
constexpr int kMaxGroup = 8;
constexpr int kMaxHeadDim = 4096;
constexpr int kMaxK = 20;    // bits per code (as magicpig.config.MAX_K)
constexpr int kMaxL = 1024;  // tables (as MAX_L): collision counters have 11 bits
constexpr int kMaxExact = 1024;  // exact head keys per query head (as MAX_EXACT_KEYS)
struct QueryGroup {
  int G = 0;
  const float* q = nullptr;        // [G][d]
  const int32_t* codes = nullptr;  // [G][L]
  const float* qnorm = nullptr;    // [G] |q|
};

struct AttendParams {
  int d = 0, K = 0, L = 0, m = 0;
  int low_bits = 0;  // bucket bits of the CSR (min(K, kMaxLowBits))
  KvDtype dtype = KvDtype::bf16;
  float scale = 0;   // 1/sqrt(d)
  // log u as a function of t = log p, cubic Hermite on a uniform grid over [t_lo, 0]:
  // table[2*i] = H(t_i), table[2*i+1] = H'(t_i) * h. For t < t_lo, log u < floor.
  const float* table = nullptr;
  int table_points = 0;
  float t_lo = 0, inv_h = 0, log_u_floor = 0;
  int exact = 0;  // best candidates kept per head for the exact head (0: plain sampling)
};

// Unnormalised partial result of one block for a group: out = acc / sum, lse = mx + log(sum).
struct Partial {
  float* acc = nullptr;   // [G][d]
  float* mx = nullptr;    // [G] running max of the scores (-inf when no candidate)
  float* sum = nullptr;   // [G] sum of exp(score - mx)
  int32_t* ncand = nullptr;  // [G] candidates found (added to)
  // [3] work done, for the benchmark's bytes-touched count (added to): bucket-list entries
  // walked, candidate rows read (union over the group), tail tokens scanned.
  int64_t* stats = nullptr;
  // With AttendParams::exact > 0: per head g, the block's best `exact` candidates by raw score
  // q.k/sqrt(d) as a heap (see keep_best): raw score, weighted score (raw - log u) and token
  // id at [g * exact + e] for e < top_n[g]. The store's merge attends them exactly.
  float* top_raw = nullptr;
  float* top_score = nullptr;
  int32_t* top_id = nullptr;
  int32_t* top_n = nullptr;
};

// Per-thread scratch of the candidate search, sized for one block. heads, bitmap and summary
// are kept zeroed between calls (the kernel clears what it set); counts are stamped.
struct Scratch {
  uint32_t* counts = nullptr;  // [65536] (stamp << 11) | collisions of the current head walk
  uint32_t* stamp = nullptr;   // the last stamp used
  uint8_t* heads = nullptr;    // [65536] bit g set when the token is a candidate of head g
  uint64_t* bitmap = nullptr;  // [1024] candidate tokens (union over the group)
  uint64_t* summary = nullptr; // [16] non-zero words of bitmap
  uint16_t* cand = nullptr;    // [65536] candidate ids, ascending
  uint8_t* cand_heads = nullptr;  // [65536]
  float* work = nullptr;       // [kMaxGroup * 3 * kChunk + d] scores and weights of a chunk
};
constexpr int kChunk = 256;  // candidates scored per online-softmax step

struct Kernels {
  const char* name;
  // Collision search + fused sampled attention over one block for one query group.
  void (*attend_block)(const BlockView& block, const QueryGroup& group, const AttendParams& params,
                       Scratch& scratch, Partial& partial);
  // col[l * col_stride + j] = rows[j * L + l] for j < count (codes known to fit uint16): the
  // transposition that turns appended codes into per-table columns for the bucket sort.
  void (*transpose_codes16)(const int32_t* rows, int64_t count, int L, uint16_t* col, int64_t col_stride);
  // norms[i] = |row_i| of n rows of d elements of the given dtype, rows `stride` bytes apart.
  void (*row_norms)(const void* rows, KvDtype dtype, int64_t n, int d, int64_t stride, float* norms);
  // SimHash of n rows of d floats (x, row-major) against proj [d][K*L] (row-major), fused with
  // the packing: codes[i * L + l] = sum_k [x_i . proj[:, l*K + k] > 0] << k.
  void (*simhash_codes)(const float* x, int64_t n, int d, const float* proj, int K, int L, int32_t* codes);
  // Row `row` of d elements of dtype (rows `stride` bytes apart) -> fp32 out.
  void (*load_row)(const void* base, KvDtype dtype, int64_t row, int d, int64_t stride, float* out);
  // q . (row `row` of keys) in fp32, rounded exactly as attend_block rounds a candidate's dot
  // (so a key scored here and there ranks the same); row: scratch of d floats.
  float (*key_dot)(const void* keys, KvDtype dtype, int64_t row, int d, int64_t stride, const float* q, float* scratch);
};

}  // namespace magicpig
