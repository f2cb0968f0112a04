// CPUStore: middle K/V and LSH bucket lists of one attention layer for many sequences.
//
// Layout per (sequence, KV head): blocks of up to 65535 consecutive tokens. A block holds its
// K and V rows in the store's dtype, fp32 key norms, and per hash table a CSR of bucket lists
// (offsets over the low `low_bits` bits of the code, uint16 token ids inside the block, plus a
// byte of high code bits when K > low_bits). Appends go to an unsorted tail of codes that
// queries scan directly; the tail is merged into the CSR when it reaches kTailMerge tokens or
// the block fills, so appends are retrievable at once and the CSR is rebuilt rarely.
//
// Blocks are shared between a sequence and its forks (Store::fork, for prefix caching): a
// sequence holds per head a list of block references, each with the number of the block's
// tokens it sees. A block referenced by more than one sequence, or seen only in part, is
// immutable; an append to a sequence whose last block is such a block starts a new one
// (copy-on-write at block granularity, with nothing to copy).
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels.h"

namespace magicpig {

// 65535, not 65536: token ids and bucket offsets (<= block length) both fit uint16, which
// halves the per-block offsets (L * (2^K + 1) of them) next to the 2-byte ids.
constexpr int kBlockTokens = 65535;
constexpr int kScratchTokens = 65536;
constexpr int kMaxLowBits = 12;   // at most 4096 buckets per table per block
constexpr int kTailMerge = 256;   // tail tokens that trigger a CSR merge
static_assert(kMaxK <= kMaxLowBits + 8, "the code bits above low_bits are kept in one byte");

void* alloc_bytes(size_t bytes, bool huge);  // huge: 2 MiB aligned + transparent huge pages
void free_bytes(void* p);

// An uninitialised growable array whose capacity is the memory it holds.
template <typename T>
class Buf {
 public:
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept { swap(o); }
  Buf& operator=(Buf&& o) noexcept {
    swap(o);
    return *this;
  }
  ~Buf() { free_bytes(ptr_); }
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t capacity() const { return cap_; }
  size_t bytes() const { return cap_ * sizeof(T); }
  // Exactly n elements, contents dropped.
  void reset(size_t n, bool huge = false) {
    free_bytes(ptr_);
    ptr_ = n ? static_cast<T*>(alloc_bytes(n * sizeof(T), huge)) : nullptr;
    cap_ = n;
  }
  // At least n elements keeping the first `keep`.
  void reserve_keep(size_t n, size_t keep, bool huge = false) {
    if (n <= cap_) return;
    T* p = static_cast<T*>(alloc_bytes(n * sizeof(T), huge));
    if (keep) std::memcpy(p, ptr_, keep * sizeof(T));
    free_bytes(ptr_);
    ptr_ = p;
    cap_ = n;
  }
  void swap(Buf& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(cap_, o.cap_);
  }
  void clear() { reset(0); }

 private:
  T* ptr_ = nullptr;
  size_t cap_ = 0;
};

struct Block {
  int32_t len = 0;
  int32_t csr_len = 0;
  int32_t cap = 0;  // tokens allocated in kv/norms
  Buf<uint8_t> kv;  // [cap][2][d]: key row then value row of each token (see BlockView)
  Buf<float> norms;
  Buf<uint16_t> offsets;  // [L][nbuckets + 1]
  Buf<uint16_t> ids;      // [L][csr_len]
  Buf<uint8_t> hi;        // [L][csr_len] when K > low_bits
  Buf<int32_t> tail;      // [len - csr_len][L]
  size_t nbytes() const {
    return kv.bytes() + norms.bytes() + offsets.bytes() + ids.bytes() + hi.bytes() +
           tail.bytes() + sizeof(Block);
  }
};

// One sequence's view of a block: the first `visible` of its tokens. A fork's last shared block
// may be seen in part (the source had appended more to it), and such a block stays so: the
// tokens past `visible` are another sequence's (or were, if that one is gone).
struct BlockRef {
  std::shared_ptr<Block> block;
  int32_t visible = 0;  // <= block->len
};

// Locking (see store.cpp): a sequence's own mutex guards its length and block references; the
// store's map mutex guards only the map and the id counter, and is never held while waiting for
// a sequence. So an append to one sequence (exclusive on it) blocks no attend of others.
struct Sequence {
  mutable std::shared_mutex mutex;  // attend, fork and read: shared; append and removal: exclusive
  bool removed = false;  // set by remove_sequence: holders of a stale pointer must not use it
  int64_t length = 0;    // the sum of `visible` over one head's blocks
  std::vector<std::vector<BlockRef>> heads;  // [Hkv][block]
  // With carry_head: the exact head of the last attend, per query head its keys as
  // block * kBlockTokens + id ([Hq][exact_keys], -1 where it held fewer; the token's position
  // when every earlier block is full, which a fork's need not be). A fork starts without one.
  // Attends hold `mutex` shared and write this, so it has its own lock.
  mutable std::mutex head_mutex;
  mutable std::vector<int64_t> last_head;
};

class AttendRun;

class Store {
 public:
  // table: Hermite table of log u over t = log p in [t_lo, 0] (see AttendParams).
  // exact_keys: per query head, the candidates of highest q.k attended exactly (weight 1, not
  // 1/u; ties to the earlier token), merged with the weighted rest; 0 = plain sampling.
  // carry_head (needs exact_keys > 0): the head is chosen among the candidates and the last
  // attend's head of the same sequence and query head, read even when not a candidate.
  Store(int num_kv_heads, int head_dim, int K, int L, int min_collisions, KvDtype dtype, int num_threads,
        std::vector<float> table, float t_lo, float h, float log_u_floor, int exact_keys = 0,
        bool carry_head = false);

  int64_t add_sequence();
  // A new sequence seeing the first `tokens` tokens of seq_id (0 <= tokens <= its length,
  // invalid_argument otherwise), then whatever is appended to it. Zero copy: it references the
  // source's blocks, which neither sequence writes again (see BlockRef). Takes the source's
  // lock shared, so it waits only for an append to the source.
  int64_t fork(int64_t seq_id, int64_t tokens);
  void remove_sequence(int64_t seq_id);
  bool has_sequence(int64_t seq_id) const;
  int64_t length(int64_t seq_id) const;
  // keys, values: [Hkv, t, d] in the store's dtype; codes: int32 [Hkv, t, L] in [0, 2^K).
  // The caller guarantees the buffer sizes (bindings.cpp checks them); t, the codes and seq_id
  // are checked here (invalid_argument / out_of_range).
  void append(int64_t seq_id, const void* keys, const void* values, const int32_t* codes, int64_t t);
  // The stored K and V rows of tokens [start, end) into keys, values [Hkv, end - start, d] of the
  // store's dtype (the caller sizes them; bindings.cpp checks). invalid_argument naming start
  // or end unless 0 <= start <= end <= length.
  void read(int64_t seq_id, int64_t start, int64_t end, void* keys, void* values) const;
  void check_read(int64_t start, int64_t end) const;  // the checks that need no sequence
  // queries fp32 [B, Hq, d]; query_codes int32 [B, Hq, L]; out fp32 [B, Hq, d];
  // lse fp32 [B, Hq]; ncand int32 [B, Hq]: keys read (the candidates, plus with carry_head the
  // carried keys its blocks did not keep). Sizes as for append; B, Hq, codes and ids checked.
  void attend(const int64_t* seq_ids, int B, int Hq, const float* queries, const int32_t* query_codes, float* out,
              float* lse, int32_t* ncand) const;
  // invalid_argument unless t >= 0 / B >= 0 and Hq is a positive multiple of num_kv_heads
  // (for the bindings, which size the buffers from them before calling append / attend).
  void check_append(int64_t t) const;
  void check_attend(int B, int Hq) const;
  // Work of the last attend (index entries walked, rows read, tail tokens scanned, tasks) and
  // seconds of the last append (copy + norms wall, bucket-list build wall, bucket-list build CPU
  // summed over threads); for the benchmark.
  std::vector<int64_t> last_attend_stats() const;
  std::vector<double> last_append_seconds() const;
  // Total: sizeof(Store) + the table + each live sequence's own overhead (the Sequence, its
  // block references, its carried head) + every block referenced by a live sequence, counted
  // once however many sequences share it. Back to the empty store's figure once all are removed.
  int64_t nbytes() const;
  // One sequence: its overhead + every block it references, shared ones included in full (so
  // the sum over sequences exceeds the total when blocks are shared).
  int64_t nbytes(int64_t seq_id) const;
  int threads() const;

  int num_kv_heads, head_dim, K, L, min_collisions, exact_keys;
  bool carry_head;
  KvDtype dtype;
  int num_threads;  // 0: OpenMP default (all cores); at most max_threads() (checks.h)

 private:
  friend class AttendRun;  // one attend call's plan and run (store.cpp)
  // The sequence (kept alive by the pointer even if removed meanwhile) or out_of_range; takes
  // the map lock only for the lookup.
  std::shared_ptr<Sequence> find(int64_t seq_id) const;
  // Index the block's stored tail plus `count` new tokens (codes of KV head h at
  // new_codes + h * head_stride, rows of L) into its CSR; adds the CPU seconds of all threads
  // to cpu_seconds.
  void merge_block(Sequence& seq, int64_t block_index, const int32_t* new_codes, int64_t head_stride,
                   int64_t count, double& cpu_seconds);
  AttendParams params() const;

  int low_bits_;
  std::vector<float> table_;
  float t_lo_, inv_h_, log_u_floor_;
  mutable std::shared_mutex seqs_mutex_;  // guards seqs_ and next_id_ only; held briefly
  int64_t next_id_ = 0;
  // Pointers, so a rehash never moves a sequence that an attend or append is using, and shared
  // ones, so a sequence outlives its removal while a caller that looked it up still holds it.
  std::unordered_map<int64_t, std::shared_ptr<Sequence>> seqs_;
  mutable std::mutex stats_mutex_;  // the two stats below: appends and attends run concurrently
  mutable std::vector<int64_t> attend_stats_ = std::vector<int64_t>(4, 0);
  std::vector<double> append_seconds_ = std::vector<double>(3, 0.0);
};

}  // namespace magicpig
