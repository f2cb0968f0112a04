// The hot kernels, compiled once per SIMD level (kernels_{avx512,avx2,scalar}.cpp define
// MAGICPIG_ISA_NS). Nothing here may live outside that namespace: identical inline names in
// differently compiled units would otherwise be merged by the linker.
//
// attend_block = collision search over the bucket lists of one 64k-token block + fused
// sampled attention of the group's query heads over the union of their candidates:
//   1. per head, walk the L buckets of its codes, count collisions in a stamped counter per
//      token (no clearing), mark tokens reaching m (head bit + bitmap); scan the short
//      unsorted tail directly;
//   2. visit the union of candidates in ascending order (bitmap), in chunks of kChunk: read
//      each key row once (bf16/fp16 expanded in registers) and dot it with every head of the
//      group; vectorised weights -log u(cos); online softmax; read each value row once and
//      accumulate it into the heads that selected it. Rows are prefetched ahead.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace MAGICPIG_ISA_NS {

using magicpig::AttendParams;
using magicpig::BlockView;
using magicpig::KvDtype;
using magicpig::Partial;
using magicpig::QueryGroup;
using magicpig::Scratch;
using magicpig::kChunk;

// Rows prefetched ahead (a 128-dim bf16 row is 4 cache lines); MAGICPIG_PREFETCH overrides.
inline int prefetch_rows() {
  static const int rows = [] {
    const char* e = std::getenv("MAGICPIG_PREFETCH");
    return e ? std::atoi(e) : 8;
  }();
  return rows;
}

inline float fmax_(float a, float b) { return a > b ? a : b; }
inline float fmin_(float a, float b) { return a < b ? a : b; }
inline float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// acos(x) for x in [-1, 1], branch-free (Cephes asinf polynomial, ~2 ulp). Near |x| = 1 it
// goes through sqrt((1-|x|)/2), so acos of values close to 1 keeps its relative precision.
inline float acos_f(float x) {
  float ax = x < 0 ? -x : x;
  bool big = ax > 0.5f;
  float z = big ? 0.5f * (1.0f - ax) : ax * ax;
  float s = big ? std::sqrt(z) : ax;
  float p = (((4.2163199048e-2f * z + 2.4181311049e-2f) * z + 4.5470025998e-2f) * z + 7.4953002686e-2f) * z +
            1.6666752422e-1f;
  float r = s + s * z * p;  // asin(s)
  float a = big ? 2.0f * r : 1.57079632679489662f - r;
  return x < 0 ? 3.14159265358979324f - a : a;
}

// log(x) for positive normal x, branch-free (atanh series, ~1 ulp).
inline float log_f(float x) {
  uint32_t u = as_uint(x);
  int e = static_cast<int>(u >> 23) - 127;
  float m = as_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  bool hi = m > 1.41421356f;
  m = hi ? 0.5f * m : m;
  e = hi ? e + 1 : e;
  float f = m - 1.0f;
  float s = f / (2.0f + f);
  float z = s * s;
  float r = z * (0.666666666666f + z * (0.4f + z * (0.285714285714f + z * (0.222222222222f + z * 0.181818181818f))));
  float fe = static_cast<float>(e);
  return fe * 0.693145751953125f + (fe * 1.428606765330187e-06f + (2.0f * s + s * r));
}

// exp(x) for x <= 0 (0 below -87, also for x = -inf), branch-free, ~1 ulp.
inline float exp_neg_f(float x) {
  bool under = !(x > -87.0f);
  x = under ? -87.0f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666666666f + r * (0.041666666666f + r * (0.0083333333333f + r * 0.0013888888889f)))));
  float scale = as_float(static_cast<uint32_t>(static_cast<int>(n) + 127) << 23);
  return under ? 0.0f : p * scale;
}

// log u(t) from the Hermite table (AttendParams), floored at log_u_floor. Scalar arguments so
// the loop calling it vectorises (gathers for the table).
inline float log_u_of_t(float t, const float* table, int last_cell, float t_lo, float inv_h, float floor_) {
  float u = (t - t_lo) * inv_h;
  float uc = fmin_(fmax_(u, 0.0f), static_cast<float>(last_cell + 1));
  int i = static_cast<int>(uc);
  i = i < last_cell ? i : last_cell;
  float f = uc - static_cast<float>(i);  // in [0, 1]
  float y0 = table[2 * i], d0 = table[2 * i + 1], y1 = table[2 * i + 2], d1 = table[2 * i + 3];
  float g = 1.0f - f;
  float h = (1.0f + 2.0f * f) * g * g * y0 + f * g * g * d0 + f * f * (3.0f - 2.0f * f) * y1 - f * f * g * d1;
  h = u < 0.0f ? floor_ : h;
  return fmax_(h, floor_);
}

// Row `row` (rows `stride` bytes apart, d elements of dtype) -> fp32 `out`.
inline void load_row(const void* base, KvDtype dtype, int64_t row, int d, int64_t stride, float* out) {
  const char* p = static_cast<const char*>(base) + row * stride;
  if (dtype == KvDtype::fp32) {
    std::memcpy(out, p, sizeof(float) * d);
    return;
  }
  const uint16_t* src = reinterpret_cast<const uint16_t*>(p);
  int k = 0;
  if (dtype == KvDtype::bf16) {
    for (; k + simd::W <= d; k += simd::W) simd::store(out + k, simd::load_bf16(src + k));
    for (; k < d; ++k) out[k] = simd::bf16_to_f32(src[k]);
  } else {
    for (; k + simd::W <= d; k += simd::W) simd::store(out + k, simd::load_f16(src + k));
    for (; k < d; ++k) out[k] = simd::f16_to_f32(src[k]);
  }
}

inline void prefetch_row(const void* base, int64_t row, int64_t stride, int row_bytes, int locality) {
  const char* p = static_cast<const char*>(base) + row * stride;
  for (int off = 0; off < row_bytes; off += 64) {
    if (locality == 3)
      __builtin_prefetch(p + off, 0, 3);
    else
      __builtin_prefetch(p + off, 0, 2);
  }
}

// dots[g] = q_g . x for the G heads of the group (x: fp32 row of d).
inline void group_dots(const float* q, int G, int d, const float* x, float* dots) {
  for (int g = 0; g < G; ++g) {
    const float* qg = q + static_cast<int64_t>(g) * d;
    simd::vf acc0 = simd::zero(), acc1 = simd::zero();
    int k = 0;
    for (; k + 2 * simd::W <= d; k += 2 * simd::W) {
      acc0 = simd::fmadd(simd::load(qg + k), simd::load(x + k), acc0);
      acc1 = simd::fmadd(simd::load(qg + k + simd::W), simd::load(x + k + simd::W), acc1);
    }
    for (; k + simd::W <= d; k += simd::W) acc0 = simd::fmadd(simd::load(qg + k), simd::load(x + k), acc0);
    float s = simd::reduce_add(acc0) + simd::reduce_add(acc1);
    for (; k < d; ++k) s += qg[k] * x[k];
    dots[g] = s;
  }
}

// acc += w * x over d.
inline void axpy(float* acc, float w, const float* x, int d) {
  simd::vf wv = simd::set1(w);
  int k = 0;
  for (; k + simd::W <= d; k += simd::W) simd::store(acc + k, simd::fmadd(wv, simd::load(x + k), simd::load(acc + k)));
  for (; k < d; ++k) acc[k] += w * x[k];
}

// Step 1: candidates of the group in this block, ascending, into scratch.cand/cand_heads.
// Returns how many; adds per-head counts to partial.ncand.
inline int find_candidates(const BlockView& B, const QueryGroup& Q, const AttendParams& P, Scratch& S,
                           Partial& out) {
  const int L = P.L, m = P.m;
  const uint32_t nb = 1u << P.low_bits;
  const uint32_t low_mask = nb - 1;
  const int64_t csr = B.csr_len;
  uint32_t* counts = S.counts;
  uint8_t* heads = S.heads;
  uint64_t* bitmap = S.bitmap;
  uint64_t* summary = S.summary;
  int64_t walked = 0;
  for (int g = 0; g < Q.G; ++g) {
    if (csr == 0) break;
    // Counters carry a stamp (one per head walk) above 11 count bits (L <= 1024), so a counter
    // of an earlier walk reads as 0 and nothing needs clearing; on wrap-around, clear once.
    uint32_t stamp = ++*S.stamp;
    if (stamp >= (1u << 20)) {
      std::memset(counts, 0, sizeof(uint32_t) * 65536);
      *S.stamp = stamp = 1;
    }
    const uint32_t base = stamp << 11, target = base + static_cast<uint32_t>(m);
    const int32_t* qc = Q.codes + static_cast<int64_t>(g) * L;
    const uint8_t bit = static_cast<uint8_t>(1u << g);
    for (int l = 0; l < L; ++l) {
      // Look ahead: the bucket offsets 8 tables on, the bucket entries 4 tables on (their
      // offsets were prefetched 4 tables ago), so the dependent misses overlap.
      if (l + 8 < L)
        __builtin_prefetch(B.offsets + static_cast<int64_t>(l + 8) * (nb + 1) + (static_cast<uint32_t>(qc[l + 8]) & low_mask), 0, 3);
      if (l + 4 < L) {
        const uint16_t* off4 = B.offsets + static_cast<int64_t>(l + 4) * (nb + 1);
        const uint32_t b4 = static_cast<uint32_t>(qc[l + 4]) & low_mask;
        __builtin_prefetch(B.ids + (l + 4) * csr + off4[b4], 0, 3);
      }
      const uint32_t code = static_cast<uint32_t>(qc[l]);
      const uint32_t b = code & low_mask;
      const uint16_t* off = B.offsets + static_cast<int64_t>(l) * (nb + 1);
      const uint16_t* ids = B.ids + l * csr;
      const uint32_t e0 = off[b], e1 = off[b + 1];
      walked += e1 - e0;
      const uint8_t* his = B.hi ? B.hi + l * csr : nullptr;
      const uint8_t want = static_cast<uint8_t>(code >> P.low_bits);
      for (uint32_t e = e0; e < e1; ++e) {
        if (his && his[e] != want) continue;
        const uint16_t id = ids[e];
        uint32_t v = counts[id];
        v = v >= base ? v + 1 : base + 1;
        counts[id] = v;
        if (v == target) {
          if (heads[id] == 0) {
            bitmap[id >> 6] |= 1ull << (id & 63);
            summary[id >> 12] |= 1ull << ((id >> 6) & 63);
          }
          heads[id] |= bit;
        }
      }
    }
  }
  // Gather the union in ascending order and clear the marks on the way. Tokens past `visible`
  // (a fork's view of a shared block) are dropped here, once per candidate, not in the bucket
  // walk above: there it would cost a compare per entry walked, for every block.
  const int visible = B.visible;
  int n = 0;
  int32_t per_head[magicpig::kMaxGroup] = {0};
  for (int sw = 0; sw < 16; ++sw) {
    uint64_t sbits = summary[sw];
    summary[sw] = 0;
    while (sbits) {
      const int w = sw * 64 + __builtin_ctzll(sbits);
      sbits &= sbits - 1;
      uint64_t bits = bitmap[w];
      bitmap[w] = 0;
      while (bits) {
        const int id = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        const uint8_t h = heads[id];
        heads[id] = 0;
        if (id >= visible) continue;  // never taken for a block seen in full
        S.cand[n] = static_cast<uint16_t>(id);
        S.cand_heads[n] = h;
        ++n;
        for (int g = 0; g < Q.G; ++g) per_head[g] += (h >> g) & 1;
      }
    }
  }
  // The unsorted tail: compare codes directly (ids after the CSR part, so order is kept), up to
  // the tokens seen (a fork may see fewer than the CSR holds: no tail then).
  const int tail = visible > B.csr_len ? visible - B.csr_len : 0;
  for (int j = 0; j < tail; ++j) {
    const int32_t* kc = B.tail_codes + static_cast<int64_t>(j) * L;
    uint8_t h = 0;
    for (int g = 0; g < Q.G; ++g) {
      const int32_t* qc = Q.codes + static_cast<int64_t>(g) * L;
      int c = 0;
#pragma omp simd reduction(+ : c)
      for (int l = 0; l < L; ++l) c += kc[l] == qc[l];
      if (c >= m) {
        h |= static_cast<uint8_t>(1u << g);
        ++per_head[g];
      }
    }
    if (h) {
      S.cand[n] = static_cast<uint16_t>(B.csr_len + j);
      S.cand_heads[n] = h;
      ++n;
    }
  }
  for (int g = 0; g < Q.G; ++g) out.ncand[g] += per_head[g];
  out.stats[0] += walked;
  out.stats[1] += n;
  out.stats[2] += tail;
  return n;
}

// Scores s = q.k/sqrt(d) - log u(cos) of one head over a chunk (-inf where not selected).
inline void chunk_scores(const float* dots, const float* inv_kn, const uint8_t* cand_heads, int n, int g,
                         float inv_qn, const AttendParams& P, float* scores) {
  const float K = static_cast<float>(P.K), scale = P.scale;
  const float* table = P.table;
  const int last_cell = P.table_points - 2;
  const float t_lo = P.t_lo, inv_h = P.inv_h, floor_ = P.log_u_floor;
  const float inv_pi = 0.318309886183790672f;
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const float dot = dots[j];
    float c = dot * inv_qn * inv_kn[j];
    c = fmin_(fmax_(c, -1.0f), 1.0f);
    // p = (1 - acos(c)/pi)^K = (acos(-c)/pi)^K, so t = log p = K log(acos(-c)/pi).
    const float a = fmax_(acos_f(-c) * inv_pi, 1e-37f);
    const float t = K * log_f(a);
    scores[j] = dot * scale - log_u_of_t(t, table, last_cell, t_lo, inv_h, floor_);
  }
  const float ninf = -__builtin_inff();
  for (int j = 0; j < n; ++j)
    if (!((cand_heads[j] >> g) & 1)) scores[j] = ninf;
}

// True when entry a ranks below entry b: a lower raw score, or the same score at a later token.
inline bool ranks_below(float raw_a, int32_t id_a, float raw_b, int32_t id_b) {
  return raw_a < raw_b || (raw_a == raw_b && id_a > id_b);
}

// What offering a candidate to a head's best-candidate heap did: whether it was kept, and
// the entry it pushed out (score and token id), if any.
struct Offer {
  bool kept = false, evicted = false;
  float score = 0;
  int32_t id = 0;
};

// Offer candidate (raw, score, id) to the `cap` best of one head, a heap rooted at the lowest
// ranked. Candidates come in ascending id order, so a tie with the root keeps the earlier one.
inline Offer keep_best(float* raw, float* score, int32_t* id, int32_t& n, int cap, float r, float s, int32_t i) {
  Offer result;
  int pos;
  if (n < cap) {
    pos = n++;
    while (pos > 0) {  // sift up while the new entry ranks below its parent
      const int parent = (pos - 1) / 2;
      if (!ranks_below(r, i, raw[parent], id[parent])) break;
      raw[pos] = raw[parent], score[pos] = score[parent], id[pos] = id[parent];
      pos = parent;
    }
  } else {
    if (!(r > raw[0])) return result;  // not better than the lowest kept
    result.evicted = true, result.score = score[0], result.id = id[0];
    pos = 0;
    for (;;) {  // sift down: move the lower-ranked child up while it ranks below the new entry
      int c = 2 * pos + 1;
      if (c >= n) break;
      if (c + 1 < n && ranks_below(raw[c + 1], id[c + 1], raw[c], id[c])) ++c;
      if (!ranks_below(raw[c], id[c], r, i)) break;
      raw[pos] = raw[c], score[pos] = score[c], id[pos] = id[c];
      pos = c;
    }
  }
  raw[pos] = r, score[pos] = s, id[pos] = i;
  result.kept = true;
  return result;
}

// Head g's online softmax moves its running max up to m (when m is higher), rescaling what it
// has summed so far; returns the max in use.
inline float raise_max(Partial& out, int g, float m, int d) {
  if (out.mx[g] < m) {
    const float corr = exp_neg_f(out.mx[g] - m);
    float* acc = out.acc + static_cast<int64_t>(g) * d;
    for (int k = 0; k < d; ++k) acc[k] *= corr;
    out.sum[g] *= corr;
    out.mx[g] = m;
  }
  return out.mx[g];
}

// Adds the weighted term exp(score) * (value row `id`) to head g's online softmax.
inline void add_term(float score, int32_t id, int g, const BlockView& B, const AttendParams& P, float* row,
                     Partial& out) {
  const float w = exp_neg_f(score - raise_max(out, g, score, P.d));
  load_row(B.values, P.dtype, id, P.d, B.row_stride, row);
  axpy(out.acc + static_cast<int64_t>(g) * P.d, w, row, P.d);
  out.sum[g] += w;
}

// The chunk's candidates of head g offered to its best-candidate heap (scores before exp).
// A kept candidate leaves the weighted sum (its score becomes -inf here): the store's merge
// adds it back, exactly if it is among the head's best over all blocks, weighted if not. An
// entry pushed out of the heap joins the weighted sum now. So every term is added, none
// subtracted: a head key that carried nearly all the weight cannot cancel to nothing.
inline void offer_chunk(const float* dots, float* scores, const uint16_t* ids, int cn, int g, const BlockView& B,
                        const AttendParams& P, float* row, Partial& out) {
  const int64_t base = static_cast<int64_t>(g) * P.exact;
  const float* root = out.top_raw + base;  // the lowest kept raw score, once the heap is full
  for (int j = 0; j < cn; ++j) {
    // Once the heap is full, nearly every candidate ranks below its root: test that first, a
    // branch the CPU predicts, unlike "is this a candidate of head g" (keep_best tests it again).
    if (out.top_n[g] == P.exact && !(dots[j] * P.scale > root[0])) continue;
    if (!(scores[j] > -__builtin_inff())) continue;  // not a candidate of this head (or NaN: stays weighted)
    const Offer o = keep_best(out.top_raw + base, out.top_score + base, out.top_id + base, out.top_n[g], P.exact,
                              dots[j] * P.scale, scores[j], ids[j]);
    if (o.kept) scores[j] = -__builtin_inff();
    if (o.evicted) add_term(o.score, o.id, g, B, P, row, out);
  }
}

void attend_block(const BlockView& B, const QueryGroup& Q, const AttendParams& P, Scratch& S, Partial& out) {
  const int n = find_candidates(B, Q, P, S, out);
  if (n == 0) return;
  const int kPrefetchRows = prefetch_rows();
  const int d = P.d, G = Q.G;
  const int row_bytes = d * magicpig::kv_itemsize(P.dtype);
  const int64_t stride = B.row_stride;
  float* dots = S.work;                       // [G][kChunk]
  float* scores = dots + G * kChunk;          // [G][kChunk]
  float* inv_kn = scores + G * kChunk;        // [kChunk]
  float* row = inv_kn + kChunk;               // [d]
  float inv_qn[magicpig::kMaxGroup];
  for (int g = 0; g < G; ++g) inv_qn[g] = Q.qnorm[g] > 0 ? 1.0f / Q.qnorm[g] : 0.0f;
  float dg[magicpig::kMaxGroup];
  for (int c0 = 0; c0 < n; c0 += kChunk) {
    const int cn = n - c0 < kChunk ? n - c0 : kChunk;
    const uint16_t* ids = S.cand + c0;
    const uint8_t* hs = S.cand_heads + c0;
    // Keys: one read per row for the whole group. Rows are prefetched to L2 kPrefetchRows
    // ahead (K across chunk boundaries, V of this chunk for the value pass) and to L1 two ahead.
    for (int j = 0; j < cn; ++j) {
      if (c0 + j + kPrefetchRows < n) prefetch_row(B.keys, S.cand[c0 + j + kPrefetchRows], stride, row_bytes, 2);
      if (j + kPrefetchRows < cn) prefetch_row(B.values, ids[j + kPrefetchRows], stride, row_bytes, 2);
      if (j + 2 < cn) prefetch_row(B.keys, ids[j + 2], stride, row_bytes, 3);
      load_row(B.keys, P.dtype, ids[j], d, stride, row);
      group_dots(Q.q, G, d, row, dg);
      for (int g = 0; g < G; ++g) dots[g * kChunk + j] = dg[g];
      const float kn = B.norms[ids[j]];
      inv_kn[j] = kn > 0 ? 1.0f / kn : 0.0f;
    }
    // Weights and the online softmax, head by head.
    for (int g = 0; g < G; ++g) {
      float* s = scores + g * kChunk;
      chunk_scores(dots + g * kChunk, inv_kn, hs, cn, g, inv_qn[g], P, s);
      if (P.exact > 0) offer_chunk(dots + g * kChunk, s, ids, cn, g, B, P, row, out);
      float cm = -__builtin_inff();
#pragma omp simd reduction(max : cm)
      for (int j = 0; j < cn; ++j) cm = cm > s[j] ? cm : s[j];
      if (!(cm > -__builtin_inff())) {  // no weighted candidate left: every weight of the value pass is 0
        std::fill(s, s + cn, 0.0f);
        continue;
      }
      const float mx = raise_max(out, g, cm, d);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < cn; ++j) {
        const float w = exp_neg_f(s[j] - mx);
        s[j] = w;
        sum += w;
      }
      out.sum[g] += sum;
    }
    // Values: one read per row, accumulated into every head that selected it.
    for (int j = 0; j < cn; ++j) {
      if (j + 2 < cn) prefetch_row(B.values, ids[j + 2], stride, row_bytes, 3);
      load_row(B.values, P.dtype, ids[j], d, stride, row);
      const uint8_t h = hs[j];
      for (int g = 0; g < G; ++g) {
        if ((h >> g) & 1) {
          const float w = scores[g * kChunk + j];
          if (w != 0.0f) axpy(out.acc + static_cast<int64_t>(g) * d, w, row, d);
        }
      }
    }
  }
}

void row_norms(const void* rows, KvDtype dtype, int64_t n, int d, int64_t stride, float* norms) {
  float buf[magicpig::kMaxHeadDim];
  for (int64_t i = 0; i < n; ++i) {
    float* x = buf;
    load_row(rows, dtype, i, d, stride, x);
    simd::vf acc = simd::zero();
    int k = 0;
    for (; k + simd::W <= d; k += simd::W) {
      simd::vf v = simd::load(x + k);
      acc = simd::fmadd(v, v, acc);
    }
    float s = simd::reduce_add(acc);
    for (; k < d; ++k) s += x[k] * x[k];
    norms[i] = std::sqrt(s);
  }
}

void transpose_codes16(const int32_t* rows, int64_t count, int L, uint16_t* col, int64_t col_stride) {
#if defined(__AVX512F__)
  // 16 tokens at a time: one gather per table of their 16 codes (rows stay in L1), narrowed to
  // 16 bits and stored as a run of 16 column entries.
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(L));
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    const int64_t jn = count - j0 < 16 ? count - j0 : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << jn) - 1);
    const int32_t* base = rows + j0 * L;
    for (int l = 0; l < L; ++l) {
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, idx, base + l, 4);
      _mm256_mask_storeu_epi16(col + l * col_stride + j0, mask, _mm512_cvtepi32_epi16(g));
    }
  }
#else
  for (int64_t j0 = 0; j0 < count; j0 += 32) {
    const int64_t jn = count - j0 < 32 ? count - j0 : 32;
    for (int l = 0; l < L; ++l) {
      uint16_t* c = col + l * col_stride + j0;
      for (int64_t j = 0; j < jn; ++j) c[j] = static_cast<uint16_t>(rows[(j0 + j) * L + l]);
    }
  }
#endif
}

// SimHash fused with the packing of the bits into codes. A tile of kHashRows rows x
// kHashVecs vectors of hyperplanes is accumulated in registers over d; the signs of the tile
// go straight into per-row bit strings (bit c = hyperplane c), whose K-bit fields are the
// codes. The [n, K*L] projections are never written to memory: the torch path writes them,
// compares them and converts the comparison to float before packing, three passes over
// n * K * L values that cost several times the matmul itself.
constexpr int kHashRows = 4;
constexpr int kHashVecs = simd::W == 8 ? 2 : 4;  // AVX2 has 16 registers: 4 x 2 accumulators

// The `width` bits of `bits` starting at bit `off` (width < 32; the string has a spare word).
inline int32_t bit_field(const uint64_t* bits, int64_t off, int width) {
  const int64_t w = off >> 6;
  const int sh = static_cast<int>(off & 63);
  uint64_t v = bits[w] >> sh;
  if (sh != 0) v |= bits[w + 1] << (64 - sh);
  return static_cast<int32_t>(v & ((uint64_t{1} << width) - 1));
}

void simhash_codes(const float* x, int64_t n, int d, const float* proj, int K, int L, int32_t* codes) {
  constexpr int R = kHashRows, V = kHashVecs, TC = kHashVecs * simd::W;
  const int KL = K * L;
  const int full = KL / TC * TC;
  const int64_t words = KL / 64 + 2;
  std::vector<uint64_t> bits(static_cast<size_t>(n * words), 0);
  // Blocks of rows (8 KB of them) x column tiles x row tiles: a tile's hyperplanes (d x TC
  // floats: 16 KB at d=64 on AVX-512) and the block's rows stay in L1 while the tile is used.
  const int64_t block = std::max<int64_t>(R, 8192 / (4 * std::max<int64_t>(d, 1)) / R * R);
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = std::min(n, b0 + block);
    for (int c0 = 0; c0 < full; c0 += TC) {
      for (int64_t i0 = b0; i0 < b1; i0 += R) {
        const int rows = static_cast<int>(std::min<int64_t>(R, b1 - i0));
        const float* xr[R];
        for (int r = 0; r < R; ++r) xr[r] = x + (i0 + (r < rows ? r : rows - 1)) * d;  // pad with the last row
        simd::vf acc[R][V];
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < V; ++v) acc[r][v] = simd::zero();
        const float* p = proj + c0;
        for (int j = 0; j < d; ++j, p += KL) {
          simd::vf pv[V];
          for (int v = 0; v < V; ++v) pv[v] = simd::load(p + v * simd::W);
          for (int r = 0; r < R; ++r) {
            const simd::vf xv = simd::set1(xr[r][j]);
            for (int v = 0; v < V; ++v) acc[r][v] = simd::fmadd(xv, pv[v], acc[r][v]);
          }
        }
        // Masks of all R rows first: indexing acc with the run-time `rows` would make the
        // compiler keep acc in memory, storing 16 vectors per step of the d loop.
        uint32_t mask[R][V];
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < V; ++v) mask[r][v] = simd::positive_mask(acc[r][v]);
        // W divides 64 and c is a multiple of W, so a vector's mask never straddles two words.
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v < V; ++v) {
            const int c = c0 + v * simd::W;
            bits[(i0 + r) * words + (c >> 6)] |= static_cast<uint64_t>(mask[r][v]) << (c & 63);
          }
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * d;
    for (int c = full; c < KL; ++c) {  // the last < TC hyperplanes, one at a time
      float s = 0.0f;
      for (int j = 0; j < d; ++j) s += xi[j] * proj[static_cast<int64_t>(j) * KL + c];
      if (s > 0.0f) bits[i * words + (c >> 6)] |= uint64_t{1} << (c & 63);
    }
    int32_t* out = codes + i * L;
    for (int l = 0; l < L; ++l) out[l] = bit_field(bits.data() + i * words, static_cast<int64_t>(l) * K, K);
  }
}

float key_dot(const void* keys, KvDtype dtype, int64_t row, int d, int64_t stride, const float* q, float* scratch) {
  load_row(keys, dtype, row, d, stride, scratch);
  float dot;
  group_dots(q, 1, d, scratch, &dot);  // per head the same sums as attend_block's group of G
  return dot;
}

const magicpig::Kernels& kernels() {
  static const magicpig::Kernels table{MAGICPIG_ISA_NAME, &attend_block, &transpose_codes16, &row_norms,
                                             &simhash_codes, &load_row, &key_dot};
  return table;
}

}  // namespace MAGICPIG_ISA_NS
