#include "store.h"

#include <omp.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <cmath>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "checks.h"
#include "dispatch.h"

namespace magicpig {

namespace {

// Per-thread scratch of attend, allocated once per OS thread and kept zeroed between calls.
struct ScratchStorage {
  std::vector<uint32_t> counts = std::vector<uint32_t>(kScratchTokens, 0);
  uint32_t stamp = 0;
  std::vector<uint8_t> heads = std::vector<uint8_t>(kScratchTokens, 0);
  std::vector<uint64_t> bitmap = std::vector<uint64_t>(kScratchTokens / 64, 0);
  std::vector<uint64_t> summary = std::vector<uint64_t>(kScratchTokens / 64 / 64, 0);
  std::vector<uint16_t> cand = std::vector<uint16_t>(kScratchTokens);
  std::vector<uint8_t> cand_heads = std::vector<uint8_t>(kScratchTokens);
  std::vector<float> work = std::vector<float>(kMaxGroup * 2 * kChunk + kChunk + kMaxHeadDim);
  Scratch view() {
    return Scratch{counts.data(), &stamp, heads.data(), bitmap.data(), summary.data(),
                   cand.data(),   cand_heads.data(), work.data()};
  }
};

Scratch thread_scratch() {
  thread_local ScratchStorage storage;
  return storage.view();
}

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

int resolve_threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

// One kept candidate of a (row, head) in attend's merge: its scores and where its value row is.
struct HeadEntry {
  float raw, score;  // q.k/sqrt(d) and raw - log u
  int64_t task;      // the block's task (tasks of one (row, head) are in block order)
  int32_t id;        // token in the block
  float exponent;    // set by rank_head: raw in the head, score outside it
};

// The exact head of one (row, head): ranks the candidates kept by every block's heap (raw
// score, then position) and sets each entry's exponent: its raw score q.k/sqrt(d) (weight 1)
// for the best `exact`, its weighted score raw - log u for the rest (block-local bests that are
// not the head's, left out of their block's sums by the kernel). Returns the largest exponent.
float rank_head(std::vector<HeadEntry>& entries, int exact) {
  const size_t keep = std::min(entries.size(), static_cast<size_t>(exact));
  std::partial_sort(entries.begin(), entries.begin() + keep, entries.end(), [](const HeadEntry& a, const HeadEntry& b) {
    if (a.raw != b.raw) return a.raw > b.raw;
    return a.task != b.task ? a.task < b.task : a.id < b.id;
  });
  float top = -std::numeric_limits<float>::infinity();
  for (size_t e = 0; e < entries.size(); ++e) {
    entries[e].exponent = e < keep ? entries[e].raw : entries[e].score;
    top = std::max(top, entries[e].exponent);
  }
  return top;
}

// carry_head: adds the last attend's head keys of one (row, query head) (positions, -1 = none)
// that are not among the entries (the blocks' kept candidates) as entries without a weighted
// score (-inf), so rank_head attends one exactly when it ranks among the best and drops it
// otherwise. A carried key that is a candidate its block did not keep ranks below the `exact`
// candidates that block kept (key_dot rounds as the kernel does, ties go the same way), so it
// never joins the head and is counted once, in its block's weighted sum. tasks [first, first +
// ntask) are the row's blocks in order. Returns the key rows read.
int add_carried(const int64_t* carried, const Sequence& seq, int h, int64_t first, int64_t ntask, const float* q,
                const AttendParams& P, const Kernels& kern, float* row, std::vector<HeadEntry>& entries) {
  const size_t kept = entries.size();
  const int64_t row_bytes = static_cast<int64_t>(P.d) * kv_itemsize(P.dtype);
  int read = 0;
  for (int e = 0; e < P.exact; ++e) {
    const int64_t pos = carried[e];
    const int64_t blk = pos / kBlockTokens;
    const int32_t id = static_cast<int32_t>(pos % kBlockTokens);
    // none, or not a token this sequence sees (a shared block's tokens past `visible` are another's)
    if (pos < 0 || blk >= ntask || id >= seq.heads[h][blk].visible) continue;
    const int64_t task = first + blk;
    bool is_entry = false;
    for (size_t i = 0; i < kept && !is_entry; ++i) is_entry = entries[i].task == task && entries[i].id == id;
    if (is_entry) continue;
    const Block& b = *seq.heads[h][blk].block;
    const float raw = kern.key_dot(b.kv.data(), P.dtype, id, P.d, 2 * row_bytes, q, row) * P.scale;
    ++read;
    if (std::isnan(raw)) continue;  // a NaN query (trusted path): nothing to rank
    entries.push_back({raw, -std::numeric_limits<float>::infinity(), task, id, 0.0f});
  }
  return read;
}

// carry_head: every row's last head, [B][Hq][E] positions (-1: none), read before the merge
// so that a sequence named twice in one batch carries the same head into both rows.
std::vector<int64_t> read_heads(const std::vector<const Sequence*>& seqs, int Hq, int E) {
  std::vector<int64_t> heads(seqs.size() * Hq * E, -1);
  for (size_t b = 0; b < seqs.size(); ++b) {
    std::lock_guard<std::mutex> g(seqs[b]->head_mutex);
    const auto& last = seqs[b]->last_head;
    if (last.size() == static_cast<size_t>(Hq) * E) std::copy(last.begin(), last.end(), heads.begin() + b * Hq * E);
  }
  return heads;
}

void write_heads(const std::vector<const Sequence*>& seqs, int Hq, int E, const std::vector<int64_t>& heads) {
  for (size_t b = 0; b < seqs.size(); ++b) {  // a sequence named twice keeps its last row's head
    std::lock_guard<std::mutex> g(seqs[b]->head_mutex);
    seqs[b]->last_head.assign(heads.begin() + b * Hq * E, heads.begin() + (b + 1) * Hq * E);
  }
}

}  // namespace

// K/V buffers of 4 MiB and more are 2 MiB aligned and marked for transparent huge pages:
// attend gathers random rows, and with 4 KiB pages nearly every row costs a TLB miss (huge pages
// measured ~20% faster attends). Other buffers stay on 4 KiB pages: with this kernel's
// defrag=madvise setting, huge-page faults compact memory and slow appends down.
// MAGICPIG_THP=0 turns huge pages off.
void* alloc_bytes(size_t bytes, bool huge) {
  static const bool thp = [] {
    const char* e = std::getenv("MAGICPIG_THP");
    return e == nullptr || std::string(e) != "0";
  }();
  constexpr size_t kHuge = size_t{2} << 20;
  void* p = nullptr;
  if (huge && thp && bytes >= 2 * kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    p = std::aligned_alloc(kHuge, rounded);
    if (p) madvise(p, rounded, MADV_HUGEPAGE);
  } else {
    p = std::malloc(bytes);
  }
  if (!p && bytes) throw std::bad_alloc();
  return p;
}

void free_bytes(void* p) { std::free(p); }

Store::Store(int num_kv_heads_, int head_dim_, int K_, int L_, int min_collisions_, KvDtype dtype_,
             int num_threads_, std::vector<float> table, float t_lo, float h, float log_u_floor, int exact_keys_,
             bool carry_head_)
    : num_kv_heads(num_kv_heads_),
      head_dim(head_dim_),
      K(K_),
      L(L_),
      min_collisions(min_collisions_),
      exact_keys(exact_keys_),
      carry_head(carry_head_),
      dtype(dtype_),
      num_threads(num_threads_),
      low_bits_(std::min(K_, kMaxLowBits)),
      table_(std::move(table)),
      t_lo_(t_lo),
      inv_h_(1.0f / h),
      log_u_floor_(log_u_floor) {
  // Checked here as well as in magicpig/store/cpu_store.py: the extension may be called directly.
  const char* where = "Store";
  check_range(where, "num_kv_heads", num_kv_heads, 1, std::numeric_limits<int64_t>::max());
  check_range(where, "head_dim", head_dim, 1, kMaxHeadDim);
  check_range(where, "K", K, 1, kMaxK);
  check_range(where, "L", L, 1, kMaxL);  // collision counters keep 11 bits (kernels_impl.h)
  check_range(where, "min_collisions", min_collisions, 1, L);
  check_range(where, "dtype", static_cast<int>(dtype), 0, 2);
  check_range(where, "exact_keys", exact_keys, 0, kMaxExact);
  if (carry_head && exact_keys == 0)
    throw std::invalid_argument("Store: carry_head: expected exact_keys > 0 (the head it carries), got exact_keys=0");
  check_threads(where, num_threads);
  // The weight lookup interpolates the table at (t - t_lo) / h: with fewer than two points
  // it reads past the end, with a NaN, infinite or non-positive step the weights mean nothing.
  if (table_.size() < 4 || table_.size() % 2)
    throw std::invalid_argument("Store: table: expected an even number >= 4 of values, got " +
                                std::to_string(table_.size()));
  if (!(std::isfinite(t_lo) && t_lo < 0) || !(std::isfinite(h) && h > 0) || !std::isfinite(log_u_floor))
    throw std::invalid_argument("Store: expected finite t_lo < 0, h > 0 and log_u_floor, got " + std::to_string(t_lo) +
                                ", " + std::to_string(h) + ", " + std::to_string(log_u_floor));
}

int Store::threads() const { return resolve_threads(num_threads); }

// Locking. seqs_mutex_ guards only the map and is never held while waiting for a sequence's
// mutex, so a long append (exclusive on its sequence) delays no attend of other sequences, nor
// add/remove of others. Only attend holds more than one sequence lock, all shared and taken in
// ascending id order; appends, forks, reads and removals hold one, so no cycle of waits can
// form. A caller may look a sequence up just before its removal and lock it just after: the
// shared_ptr keeps the object valid and `removed` (set under the exclusive lock) makes it answer
// like an unknown id, so a removal is ordered before every use that has not yet locked it.
//
// Shared blocks. A block is written only by an append to the one sequence that references it,
// seeing it in full (writable_tail); every other block is immutable, so an attend or read of a
// fork locks only the fork, though the source appends meanwhile. The use_count test is race
// free: the count rises above 1 only by a fork of a sequence that references the block, which
// takes that sequence's lock shared. When the appending sequence is the only one (count 1),
// that fork would be of the appending sequence itself, whose exclusive lock the append holds.
// A count read as 2 while another referencing sequence is being removed only starts a new block
// early. A count of 1 read after such a removal follows the removal's release decrement (the
// acquire fence in writable_tail), and the removal waited for that sequence's readers: so the
// append's writes come after every read of the block by others.
namespace {

[[noreturn]] void unknown(int64_t seq_id) { throw std::out_of_range("unknown seq_id " + std::to_string(seq_id)); }

// Whether an append may write into the sequence's last block of every head: one exists, is not
// full, is referenced by this sequence only and is seen in full by it. Under the exclusive lock
// (see Locking); the heads' blocks are forked together, so they agree but for a removal under way.
bool writable_tail(const Sequence& seq) {
  if (seq.heads.empty() || seq.heads[0].empty() || seq.heads[0].back().visible == kBlockTokens) return false;
  bool sole = true;
  for (const auto& blocks : seq.heads) {
    const BlockRef& last = blocks.back();
    sole = sole && last.block.use_count() == 1 && last.visible == last.block->len;
  }
  std::atomic_thread_fence(std::memory_order_acquire);  // pairs with a sharer's release of its reference
  return sole;
}

// What a sequence holds besides its blocks: the object, its block references, its carried head.
int64_t sequence_overhead(const Sequence& s) {
  int64_t total = sizeof(Sequence);
  {
    std::lock_guard<std::mutex> g(s.head_mutex);
    total += static_cast<int64_t>(s.last_head.capacity() * sizeof(int64_t));
  }
  for (const auto& blocks : s.heads) total += static_cast<int64_t>(blocks.capacity() * sizeof(BlockRef));
  return total;
}

}  // namespace

std::shared_ptr<Sequence> Store::find(int64_t seq_id) const {
  std::shared_lock lock(seqs_mutex_);
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) unknown(seq_id);
  return it->second;
}

int64_t Store::add_sequence() {
  auto s = std::make_shared<Sequence>();
  s->heads.resize(num_kv_heads);
  std::unique_lock lock(seqs_mutex_);
  const int64_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

int64_t Store::fork(int64_t seq_id, int64_t tokens) {
  auto copy = std::make_shared<Sequence>();
  copy->heads.resize(num_kv_heads);
  {
    const auto src = find(seq_id);
    std::shared_lock lock(src->mutex);  // an append to the source waits; its attends go on
    if (src->removed) unknown(seq_id);
    check_range("Store.fork", "tokens", tokens, 0, src->length);
    for (int h = 0; h < num_kv_heads; ++h) {
      int64_t left = tokens;  // the source's blocks in order, the last one cut at `tokens`
      for (size_t i = 0; left > 0; ++i) {
        const BlockRef& ref = src->heads[h][i];
        const int32_t seen = static_cast<int32_t>(std::min<int64_t>(ref.visible, left));
        copy->heads[h].push_back({ref.block, seen});
        left -= seen;
      }
    }
    copy->length = tokens;
  }
  std::unique_lock lock(seqs_mutex_);
  const int64_t id = next_id_++;
  seqs_.emplace(id, std::move(copy));
  return id;
}

void Store::remove_sequence(int64_t seq_id) {
  std::shared_ptr<Sequence> s;
  {
    std::unique_lock lock(seqs_mutex_);
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) unknown(seq_id);
    s = std::move(it->second);
    seqs_.erase(it);
  }
  // Waits for the attends and the append using it, then frees its memory here (not whenever
  // the last stale pointer goes), so the memory is back when this returns; blocks that forks
  // (or their source) still reference stay with them.
  std::unique_lock lock(s->mutex);
  s->removed = true;
  std::vector<std::vector<BlockRef>>().swap(s->heads);
}

bool Store::has_sequence(int64_t seq_id) const {
  std::shared_lock lock(seqs_mutex_);
  return seqs_.count(seq_id) != 0;
}

int64_t Store::length(int64_t seq_id) const {
  const auto s = find(seq_id);
  std::shared_lock lock(s->mutex);
  if (s->removed) unknown(seq_id);
  return s->length;
}

int64_t Store::nbytes(int64_t seq_id) const {
  const auto s = find(seq_id);
  std::shared_lock lock(s->mutex);
  if (s->removed) unknown(seq_id);
  int64_t total = sequence_overhead(*s);
  for (const auto& blocks : s->heads)
    for (const BlockRef& ref : blocks) total += static_cast<int64_t>(ref.block->nbytes());
  return total;
}

int64_t Store::nbytes() const {
  std::vector<std::shared_ptr<Sequence>> all;
  {
    std::shared_lock lock(seqs_mutex_);
    all.reserve(seqs_.size());
    for (const auto& kv : seqs_) all.push_back(kv.second);
  }
  int64_t total = static_cast<int64_t>(sizeof(Store) + table_.size() * sizeof(float));
  std::unordered_set<const Block*> counted;  // a block shared by forks is held once
  for (const auto& s : all) {  // one sequence lock at a time (see Locking)
    std::shared_lock lock(s->mutex);
    if (s->removed) continue;
    total += sequence_overhead(*s);
    for (const auto& blocks : s->heads)
      for (const BlockRef& ref : blocks)
        if (counted.insert(ref.block.get()).second) total += static_cast<int64_t>(ref.block->nbytes());
  }
  return total;
}

void Store::append(int64_t seq_id, const void* keys, const void* values, const int32_t* codes, int64_t t) {
  check_append(t);
  // Out-of-range codes would not overrun memory (buckets are masked) but would be indexed
  // under the wrong buckets; checked before the lock so a scan of a long prefill blocks nobody.
  check_codes("key_codes", codes, checked_product("key_codes", {num_kv_heads, t, L}), K);
  const auto held = find(seq_id);
  std::unique_lock lock(held->mutex);  // this sequence only: attends of others go on
  if (held->removed) unknown(seq_id);
  Sequence& seq = *held;
  const int64_t row_bytes = static_cast<int64_t>(head_dim) * kv_itemsize(dtype);
  const Kernels& kern = active_kernels();
  const int nt = threads();
  int64_t pos = 0;
  double copy_s = 0, index_s = 0, index_cpu = 0;
  while (pos < t) {
    const double t0 = omp_get_wtime();
    // A full last block, or one shared with a fork or seen in part, is left as it is (copy-on-
    // write at block granularity: the new tokens start a block of their own).
    if (!writable_tail(seq))
      for (auto& blocks : seq.heads) blocks.push_back({std::make_shared<Block>(), 0});
    const std::vector<BlockRef>& first = seq.heads[0];
    const int64_t bi = static_cast<int64_t>(first.size()) - 1;
    const Block& last = *first.back().block;
    const int64_t take = std::min<int64_t>(kBlockTokens - last.len, t - pos);
    const bool merge = last.len - last.csr_len + take >= kTailMerge || last.len + take == kBlockTokens;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int h = 0; h < num_kv_heads; ++h) {
      BlockRef& ref = seq.heads[h][bi];
      Block& b = *ref.block;
      const int64_t need = b.len + take;
      if (need > b.cap) {
        // Exact for bulk appends, geometric for token-by-token ones (amortised copies).
        const int64_t cap = std::min<int64_t>(kBlockTokens, std::max<int64_t>(need, b.cap + b.cap / 2));
        b.kv.reserve_keep(cap * 2 * row_bytes, b.len * 2 * row_bytes, /*huge=*/true);
        b.norms.reserve_keep(cap, b.len);
        b.cap = static_cast<int32_t>(cap);
      }
      const int64_t src = (static_cast<int64_t>(h) * t + pos);
      uint8_t* dst = b.kv.data() + b.len * 2 * row_bytes;
      const uint8_t* ksrc = static_cast<const uint8_t*>(keys) + src * row_bytes;
      const uint8_t* vsrc = static_cast<const uint8_t*>(values) + src * row_bytes;
      for (int64_t i = 0; i < take; ++i) {
        std::memcpy(dst + 2 * i * row_bytes, ksrc + i * row_bytes, row_bytes);
        std::memcpy(dst + (2 * i + 1) * row_bytes, vsrc + i * row_bytes, row_bytes);
      }
      kern.row_norms(dst, dtype, take, head_dim, 2 * row_bytes, b.norms.data() + b.len);
      if (!merge) {  // codes wait in the tail; a merge reads them straight from the input
        const int64_t tail_len = b.len - b.csr_len;
        const size_t tail_need = static_cast<size_t>(tail_len + take) * L;
        if (tail_need > b.tail.capacity())  // geometric: token-by-token appends copy O(1) each
          b.tail.reserve_keep(std::max(tail_need, 2 * b.tail.capacity()), tail_len * L);
        std::memcpy(b.tail.data() + tail_len * L, codes + src * L, take * L * sizeof(int32_t));
      }
      b.len = static_cast<int32_t>(need);
      ref.visible = b.len;
    }
    seq.length += take;
    const double t1 = omp_get_wtime();
    if (merge) merge_block(seq, bi, codes + pos * L, t * L, take, index_cpu);
    pos += take;
    copy_s += t1 - t0;
    index_s += omp_get_wtime() - t1;
  }
  std::lock_guard<std::mutex> g(stats_mutex_);
  append_seconds_ = {copy_s, index_s, index_cpu};
}

void Store::check_append(int64_t t) const {
  check_range("Store.append", "t", t, 0, std::numeric_limits<int64_t>::max());
}

void Store::check_read(int64_t start, int64_t end) const {
  check_range("Store.read", "start", start, 0, std::numeric_limits<int64_t>::max());
  check_range("Store.read", "end", end, start, std::numeric_limits<int64_t>::max());
}

void Store::read(int64_t seq_id, int64_t start, int64_t end, void* keys, void* values) const {
  check_read(start, end);
  const auto held = find(seq_id);
  std::shared_lock lock(held->mutex);
  if (held->removed) unknown(seq_id);
  check_range("Store.read", "end", end, start, held->length);
  const int64_t row_bytes = static_cast<int64_t>(head_dim) * kv_itemsize(dtype);
  const int64_t n = end - start;
  for (int h = 0; h < num_kv_heads; ++h) {
    uint8_t* kdst = static_cast<uint8_t*>(keys) + h * n * row_bytes;
    uint8_t* vdst = static_cast<uint8_t*>(values) + h * n * row_bytes;
    int64_t first = 0;  // the sequence's position of the block's token 0 (blocks need not be full)
    for (const BlockRef& ref : held->heads[h]) {
      const int64_t lo = std::max(start, first), hi = std::min(end, first + ref.visible);
      const uint8_t* rows = ref.block->kv.data();  // [token][2][d]: key row, then value row
      for (int64_t p = lo; p < hi; ++p) {
        std::memcpy(kdst + (p - start) * row_bytes, rows + (p - first) * 2 * row_bytes, row_bytes);
        std::memcpy(vdst + (p - start) * row_bytes, rows + ((p - first) * 2 + 1) * row_bytes, row_bytes);
      }
      first += ref.visible;
      if (first >= end) break;
    }
  }
}

// Query heads in groups of G = Hq / num_kv_heads; groups above kMaxGroup are split into
// sub-groups (see attend), so there is no upper limit but the buffers' sizes.
void Store::check_attend(int B, int Hq) const {
  check_range("Store.attend", "B", B, 0, std::numeric_limits<int64_t>::max());
  if (Hq < 1 || Hq % num_kv_heads)
    throw std::invalid_argument("Store.attend: Hq=" + std::to_string(Hq) +
                                ": expected a positive multiple of num_kv_heads=" + std::to_string(num_kv_heads));
}

std::vector<int64_t> Store::last_attend_stats() const {
  std::lock_guard<std::mutex> g(stats_mutex_);
  return attend_stats_;
}

std::vector<double> Store::last_append_seconds() const {
  std::lock_guard<std::mutex> g(stats_mutex_);
  return append_seconds_;
}

namespace {

// Counting sort of table l's new tokens into the existing CSR of the block (new ids come after
// the old ones of the same bucket, so every bucket stays ascending).
template <typename Col>
void merge_table(const Col* col, int64_t T, int64_t old_len, int low_bits, bool with_hi, const uint16_t* old_off,
                 const uint16_t* old_ids, const uint8_t* old_hi, uint16_t* new_off, uint16_t* new_ids,
                 uint8_t* new_hi, std::vector<uint32_t>& cnt) {
  const uint32_t nb = 1u << low_bits, mask = nb - 1;
  std::fill(cnt.begin(), cnt.begin() + nb, 0u);
  for (int64_t j = 0; j < T; ++j) ++cnt[col[j] & mask];
  uint32_t start = 0;  // <= kBlockTokens = 65535, so it fits the uint16 offsets
  new_off[0] = 0;
  for (uint32_t b = 0; b < nb; ++b) {
    const uint32_t old_count = old_len ? static_cast<uint32_t>(old_off[b + 1] - old_off[b]) : 0;
    if (old_count) {
      std::memcpy(new_ids + start, old_ids + old_off[b], old_count * sizeof(uint16_t));
      if (with_hi) std::memcpy(new_hi + start, old_hi + old_off[b], old_count);
    }
    const uint32_t next = start + old_count + cnt[b];
    cnt[b] = start + old_count;  // next write position of the bucket
    new_off[b + 1] = static_cast<uint16_t>(next);
    start = next;
  }
  for (int64_t j = 0; j < T; ++j) {
    const uint32_t c = col[j];
    const uint32_t p = cnt[c & mask]++;
    new_ids[p] = static_cast<uint16_t>(old_len + j);
    if (with_hi) new_hi[p] = static_cast<uint8_t>(c >> low_bits);
  }
}

}  // namespace

// The transposed-codes buffer of merges, kept between calls (one merge at a time uses it; a
// concurrent merge, of another sequence or store, allocates its own).
struct ColPool {
  std::mutex mutex;
  Buf<uint8_t> buf;
};

ColPool& col_pool() {
  static ColPool pool;
  return pool;
}

void Store::merge_block(Sequence& seq, int64_t bi, const int32_t* new_codes, int64_t head_stride, int64_t count,
                        double& cpu_seconds) {
  const Block& b0 = *seq.heads[0][bi].block;
  const int64_t old_len = b0.csr_len;
  const int64_t T_old = b0.len - b0.csr_len - count;  // rows waiting in the stored tail
  const int64_t T = T_old + count;
  if (T == 0) return;
  const int64_t new_len = old_len + T;
  const uint32_t nb = 1u << low_bits_;
  const bool with_hi = K > low_bits_;
  const bool narrow = K <= 16;  // codes fit uint16
  const int nt = threads();
  const Kernels& kern = active_kernels();
  const int64_t Tp = (T + 63) / 64 * 64 + 32;  // padded column stride (entries)
  const size_t col_bytes = static_cast<size_t>(L) * Tp * (narrow ? 2 : 4);
  ColPool& pool = col_pool();
  std::unique_lock<std::mutex> pool_lock(pool.mutex, std::try_to_lock);
  Buf<uint8_t> own;
  Buf<uint8_t>& col = pool_lock.owns_lock() ? pool.buf : own;
  if (col.capacity() < col_bytes) col.reset(col_bytes);
  for (int h = 0; h < num_kv_heads; ++h) {
    Block& b = *seq.heads[h][bi].block;  // writable (append checked writable_tail)
    Buf<uint16_t> offs;
    Buf<uint16_t> ids;
    Buf<uint8_t> his;
    offs.reset(static_cast<size_t>(L) * (nb + 1));
    ids.reset(static_cast<size_t>(L) * new_len);
    if (with_hi) his.reset(static_cast<size_t>(L) * new_len);
    const int32_t* stored = b.tail.data();
    const int32_t* fresh = new_codes + h * head_stride;
#pragma omp parallel num_threads(nt)
    {
      const double c0 = thread_cpu_seconds();
      // rows [T][L] (stored tail, then the new rows) -> columns [L][T]
      // rows [T][L] (stored tail, then the new rows) -> columns [L][Tp], in tiles of 64 tokens
      // (their rows stay in L1); the column stride Tp is padded off a power of two so the
      // columns do not all fall into the same cache sets.
#pragma omp for schedule(static)
      for (int64_t j0 = 0; j0 < T; j0 += 64) {
        const int64_t j1 = std::min(T, j0 + 64);
        // split the tile where the stored tail ends and the fresh rows begin
        for (int64_t a = j0; a < j1;) {
          const int64_t b_end = a < T_old ? std::min(j1, T_old) : j1;
          const int32_t* src = a < T_old ? stored + a * L : fresh + (a - T_old) * L;
          if (narrow) {
            kern.transpose_codes16(src, b_end - a, L, reinterpret_cast<uint16_t*>(col.data()) + a, Tp);
          } else {
            uint32_t* c = reinterpret_cast<uint32_t*>(col.data());
            for (int l = 0; l < L; ++l)
              for (int64_t j = a; j < b_end; ++j) c[l * Tp + j] = static_cast<uint32_t>(src[(j - a) * L + l]);
          }
          a = b_end;
        }
      }
      std::vector<uint32_t> cnt(nb);
#pragma omp for schedule(dynamic, 4)
      for (int l = 0; l < L; ++l) {
        const uint16_t* old_off = old_len ? b.offsets.data() + static_cast<int64_t>(l) * (nb + 1) : nullptr;
        const uint16_t* old_ids = old_len ? b.ids.data() + l * old_len : nullptr;
        const uint8_t* old_hi = (old_len && with_hi) ? b.hi.data() + l * old_len : nullptr;
        uint16_t* no = offs.data() + static_cast<int64_t>(l) * (nb + 1);
        uint16_t* ni = ids.data() + l * new_len;
        uint8_t* nh = with_hi ? his.data() + l * new_len : nullptr;
        if (narrow)
          merge_table(reinterpret_cast<const uint16_t*>(col.data()) + l * Tp, T, old_len, low_bits_, with_hi, old_off,
                      old_ids, old_hi, no, ni, nh, cnt);
        else
          merge_table(reinterpret_cast<const uint32_t*>(col.data()) + l * Tp, T, old_len, low_bits_, with_hi,
                      old_off, old_ids, old_hi, no, ni, nh, cnt);
      }
      const double used = thread_cpu_seconds() - c0;
#pragma omp atomic
      cpu_seconds += used;
    }
    b.offsets.swap(offs);
    b.ids.swap(ids);
    b.hi.swap(his);
    b.tail.clear();
    b.csr_len = static_cast<int32_t>(new_len);
  }
  if (col.capacity() > (size_t{64} << 20)) col.clear();  // do not keep a huge buffer around
}

AttendParams Store::params() const {
  AttendParams p;
  p.d = head_dim;
  p.K = K;
  p.L = L;
  p.m = min_collisions;
  p.low_bits = low_bits_;
  p.dtype = dtype;
  p.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  p.table = table_.data();
  p.table_points = static_cast<int>(table_.size() / 2);
  p.t_lo = t_lo_;
  p.inv_h = inv_h_;
  p.log_u_floor = log_u_floor_;
  p.exact = exact_keys;
  return p;
}

// One attend call, planned then run (as FlashInfer plans a batch once and runs it): the
// constructor locks the batch's sequences and lists the tasks, run_blocks() runs the kernel on
// every (row, KV head, head group, block) task in parallel into per-task partial results,
// merge() combines each (row, query head)'s blocks by log-sum-exp, with the exact head when
// exact_keys > 0 (and the carried head with carry_head). The store's results do not depend on
// how the work is split here: each task's partial is the kernel's, merged in block order.
class AttendRun {
 public:
  AttendRun(const Store& store, const int64_t* seq_ids, int B, int Hq, const float* queries,
            const int32_t* query_codes)
      : st_(store), B_(B), Hq_(Hq), H_(store.num_kv_heads), d_(store.head_dim), G_(Hq / store.num_kv_heads),
        nsub_((G_ + kMaxGroup - 1) / kMaxGroup), E_(store.exact_keys), queries_(queries), codes_(query_codes),
        P_(store.params()), kern_(active_kernels()) {
    lock_sequences(seq_ids);
    collect_tasks();
    allocate_partials();
    query_norms();
  }

  void run_blocks() {
    const int64_t n = static_cast<int64_t>(tasks_.size());
    const int nt = st_.threads();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) run_task(i);
  }

  // The work of this attend (index entries walked, rows read, tail tokens scanned, tasks).
  std::vector<int64_t> stats() const {
    std::vector<int64_t> total(4, 0);
    const int64_t n = static_cast<int64_t>(tasks_.size());
    for (int64_t i = 0; i < n; ++i)
      for (int j = 0; j < 3; ++j) total[j] += work_[i * 3 + j];
    total[3] = n;
    return total;
  }

  void merge(float* out, float* lse, int32_t* ncand) {
    index_tasks();
    std::vector<int64_t> carried = st_.carry_head ? read_heads(seqs_, Hq_, E_) : std::vector<int64_t>();
    std::vector<int64_t> next_heads(carried.size(), -1);
    std::vector<HeadEntry> entries;
    std::vector<float> value_row(E_ > 0 ? d_ : 0);
    for (int b = 0; b < B_; ++b)
      for (int hq = 0; hq < Hq_; ++hq) {
        const int64_t row = static_cast<int64_t>(b) * Hq_ + hq;
        ncand[row] = gather_head(b, hq, carried, next_heads, entries, value_row.data());
        lse[row] = combine(b, hq, entries, value_row.data(), out + row * d_);
      }
    if (st_.carry_head) write_heads(seqs_, Hq_, E_, next_heads);
  }

 private:
  struct Task {
    int b, h, sub, block;
  };

  // Each distinct sequence once (a second shared lock of the same mutex by this thread could
  // deadlock behind a waiting writer), in ascending id order (see Locking), held to the end:
  // the tasks read the blocks on other threads, and their list depends on the lengths.
  void lock_sequences(const int64_t* seq_ids) {
    std::vector<int64_t> ids(seq_ids, seq_ids + B_);
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    held_.reserve(ids.size());
    for (int64_t id : ids) held_.push_back(st_.find(id));
    locks_.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      locks_.emplace_back(held_[i]->mutex);
      if (held_[i]->removed) unknown(ids[i]);
    }
    seqs_.resize(B_);
    for (int b = 0; b < B_; ++b)
      seqs_[b] = held_[std::lower_bound(ids.begin(), ids.end(), seq_ids[b]) - ids.begin()].get();
  }

  void collect_tasks() {
    for (int b = 0; b < B_; ++b)
      for (int h = 0; h < H_; ++h)
        for (int sub = 0; sub < nsub_; ++sub)
          for (int blk = 0; blk < static_cast<int>(seqs_[b]->heads[h].size()); ++blk) tasks_.push_back({b, h, sub, blk});
  }

  // Per task and head of its group: the kernel's running output, max and sum, candidates, and
  // with an exact head the block's best E candidates (kernels_impl.h, Partial).
  void allocate_partials() {
    const int64_t n = static_cast<int64_t>(tasks_.size());
    acc_.assign(n * kMaxGroup * d_, 0.0f);
    mx_.assign(n * kMaxGroup, -std::numeric_limits<float>::infinity());
    sums_.assign(n * kMaxGroup, 0.0f);
    counts_.assign(n * kMaxGroup, 0);
    work_.assign(n * 3, 0);
    const size_t top_size = E_ > 0 ? static_cast<size_t>(n) * kMaxGroup * E_ : 0;
    top_raw_.resize(top_size);
    top_score_.resize(top_size);
    top_id_.resize(top_size);
    top_n_.assign(E_ > 0 ? n * kMaxGroup : 0, 0);
  }

  void query_norms() {
    qnorm_.resize(static_cast<size_t>(B_) * Hq_);
    for (int64_t i = 0; i < static_cast<int64_t>(B_) * Hq_; ++i) {
      double s = 0;
      for (int k = 0; k < d_; ++k) s += static_cast<double>(queries_[i * d_ + k]) * queries_[i * d_ + k];
      qnorm_[i] = static_cast<float>(std::sqrt(s));
    }
  }

  void run_task(int64_t i) {
    const Task& tk = tasks_[i];
    const BlockRef& ref = seqs_[tk.b]->heads[tk.h][tk.block];
    const Block& blk = *ref.block;
    BlockView v;
    v.len = blk.len;
    v.visible = ref.visible;
    v.csr_len = blk.csr_len;
    const int64_t row_bytes = static_cast<int64_t>(d_) * kv_itemsize(st_.dtype);
    v.keys = blk.kv.data();
    v.values = blk.kv.data() + row_bytes;
    v.row_stride = 2 * row_bytes;
    v.norms = blk.norms.data();
    v.offsets = blk.offsets.data();
    v.ids = blk.ids.data();
    v.hi = st_.K > P_.low_bits ? blk.hi.data() : nullptr;
    v.tail_codes = blk.tail.data();
    const int head0 = tk.h * G_ + tk.sub * kMaxGroup;
    QueryGroup q;
    q.G = std::min(kMaxGroup, G_ - tk.sub * kMaxGroup);
    q.q = queries_ + (static_cast<int64_t>(tk.b) * Hq_ + head0) * d_;
    q.codes = codes_ + (static_cast<int64_t>(tk.b) * Hq_ + head0) * st_.L;
    q.qnorm = qnorm_.data() + static_cast<int64_t>(tk.b) * Hq_ + head0;
    Partial part{acc_.data() + i * kMaxGroup * d_, mx_.data() + i * kMaxGroup, sums_.data() + i * kMaxGroup,
                 counts_.data() + i * kMaxGroup, work_.data() + i * 3};
    if (E_ > 0) {
      const int64_t top0 = i * kMaxGroup * E_;
      part.top_raw = top_raw_.data() + top0;
      part.top_score = top_score_.data() + top0;
      part.top_id = top_id_.data() + top0;
      part.top_n = top_n_.data() + i * kMaxGroup;
    }
    Scratch scratch = thread_scratch();
    kern_.attend_block(v, q, P_, scratch, part);
  }

  // The tasks of each (row, KV head, head group) are consecutive, in block order.
  void index_tasks() {
    first_task_.assign(static_cast<size_t>(B_) * H_ * nsub_, -1);
    ntask_.assign(static_cast<size_t>(B_) * H_ * nsub_, 0);
    for (int64_t i = 0; i < static_cast<int64_t>(tasks_.size()); ++i) {
      const int64_t key = (static_cast<int64_t>(tasks_[i].b) * H_ + tasks_[i].h) * nsub_ + tasks_[i].sub;
      if (first_task_[key] < 0) first_task_[key] = i;
      ++ntask_[key];
    }
  }

  int64_t group_key(int b, int hq) const {
    return (static_cast<int64_t>(b) * H_ + hq / G_) * nsub_ + (hq % G_) / kMaxGroup;
  }

  // One (row, query head): the largest block maximum (max_), the keys read, and with an exact
  // head the blocks' kept candidates (plus the carried head) ranked into `entries`, their
  // positions recorded for the next attend's carried head.
  int32_t gather_head(int b, int hq, const std::vector<int64_t>& carried, std::vector<int64_t>& next_heads,
                      std::vector<HeadEntry>& entries, float* value_row) {
    const int g = (hq % G_) % kMaxGroup;
    const int64_t key = group_key(b, hq), first = first_task_[key], n = ntask_[key];
    float M = -std::numeric_limits<float>::infinity();
    int32_t count = 0;
    for (int64_t i = first; i >= 0 && i < first + n; ++i) {
      M = std::max(M, mx_[i * kMaxGroup + g]);
      count += counts_[i * kMaxGroup + g];
    }
    entries.clear();
    if (E_ > 0) {  // the blocks' kept candidates, left out of their sums (kernels_impl.h, offer_chunk)
      for (int64_t i = first; i >= 0 && i < first + n; ++i) {
        const int64_t t = i * kMaxGroup + g;
        for (int e = 0; e < top_n_[t]; ++e)
          entries.push_back({top_raw_[t * E_ + e], top_score_[t * E_ + e], i, top_id_[t * E_ + e], 0.0f});
      }
      const int64_t row_head = (static_cast<int64_t>(b) * Hq_ + hq) * E_;
      if (st_.carry_head)
        count += add_carried(carried.data() + row_head, *seqs_[b], hq / G_, first, n,
                             queries_ + (static_cast<int64_t>(b) * Hq_ + hq) * d_, P_, kern_, value_row, entries);
      M = std::max(M, rank_head(entries, E_));
      if (st_.carry_head)  // rank_head sorted the head first
        for (size_t e = 0; e < std::min(entries.size(), static_cast<size_t>(E_)); ++e)
          next_heads[row_head + e] = tasks_[entries[e].task].block * static_cast<int64_t>(kBlockTokens) + entries[e].id;
    }
    max_ = M;
    return count;
  }

  // The (row, query head)'s output o [d] from its blocks' partials and the entries, weighted
  // by exp(. - max_); returns its log-sum-exp (-inf with o = 0 when it has no candidate).
  float combine(int b, int hq, const std::vector<HeadEntry>& entries, float* value_row, float* o) const {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int g = (hq % G_) % kMaxGroup;
    const int64_t key = group_key(b, hq), first = first_task_[key], n = ntask_[key];
    const float M = max_;
    std::fill(o, o + d_, 0.0f);
    if (!(M > ninf)) return ninf;
    double S = 0;
    for (int64_t i = first; i < first + n; ++i) {
      const float m_i = mx_[i * kMaxGroup + g];
      if (!(m_i > ninf)) continue;
      const float w = std::exp(m_i - M);
      S += static_cast<double>(w) * sums_[i * kMaxGroup + g];
      const float* a = acc_.data() + (i * kMaxGroup + g) * d_;
      for (int k = 0; k < d_; ++k) o[k] += w * a[k];
    }
    const int64_t row_bytes = static_cast<int64_t>(d_) * kv_itemsize(st_.dtype);
    for (const HeadEntry& e : entries) {  // every term added, none subtracted
      if (!(e.exponent > ninf)) continue;  // a carried key outside the head: no term
      const float w = std::exp(e.exponent - M);
      const Block& blk = *seqs_[b]->heads[hq / G_][tasks_[e.task].block].block;
      kern_.load_row(blk.kv.data() + row_bytes, st_.dtype, e.id, d_, 2 * row_bytes, value_row);
      for (int k = 0; k < d_; ++k) o[k] += w * value_row[k];
      S += w;
    }
    const float inv = static_cast<float>(1.0 / S);
    for (int k = 0; k < d_; ++k) o[k] *= inv;
    return M + static_cast<float>(std::log(S));
  }

  const Store& st_;
  const int B_, Hq_, H_, d_, G_, nsub_, E_;
  const float* queries_;
  const int32_t* codes_;
  const AttendParams P_;
  const Kernels& kern_;
  std::vector<std::shared_ptr<Sequence>> held_;
  std::vector<std::shared_lock<std::shared_mutex>> locks_;
  std::vector<const Sequence*> seqs_;
  std::vector<Task> tasks_;
  std::vector<float> acc_, mx_, sums_, qnorm_, top_raw_, top_score_;
  std::vector<int32_t> counts_, top_id_, top_n_;
  std::vector<int64_t> work_, first_task_, ntask_;
  float max_ = 0.0f;  // gather_head's maximum, read by combine for the same (row, head)
};

void Store::attend(const int64_t* seq_ids, int B, int Hq, const float* queries, const int32_t* query_codes,
                   float* out, float* lse, int32_t* ncand) const {
  check_attend(B, Hq);
  check_codes("query_codes", query_codes, checked_product("query_codes", {B, Hq, L}), K);
  AttendRun run(*this, seq_ids, B, Hq, queries, query_codes);
  run.run_blocks();
  {
    std::lock_guard<std::mutex> g(stats_mutex_);
    attend_stats_ = run.stats();
  }
  run.merge(out, lse, ncand);
}

}  // namespace magicpig
