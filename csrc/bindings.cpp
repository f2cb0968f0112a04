// pybind11 module magicpig._C: cpu_info(), the SIMD level switch, SimHash codes and the Store.
// magicpig/store and magicpig/lsh validate arrays before calling in, but these entry points may
// be called directly, so each also checks its scalars (checks.h, Store, simhash_codes) and that
// every buffer holds exactly the items its sizes imply, C-contiguous (checked_ptr): bad arguments
// raise ValueError / IndexError instead of crashing the process. The heavy calls release the GIL.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

#include "checks.h"
#include "dispatch.h"
#include "simhash.h"
#include "store.h"

namespace py = pybind11;
using magicpig::checked_product;
using magicpig::KvDtype;
using magicpig::Store;

namespace {

// True when the buffer's elements are laid out densely in C order (dimensions of size 1 may
// carry any stride, as numpy gives them).
bool c_contiguous(const py::buffer_info& info) {
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expected) return false;
    expected *= info.shape[i];
  }
  return true;
}

// The data pointer of a buffer holding exactly `count` C-contiguous items of `itemsize` bytes
// (`what` says what the count is made of, for the message). Every entry point takes its sizes
// as separate arguments, so a buffer smaller than they imply would be read or written past its
// end; this turns that into a ValueError naming the argument.
void* checked_ptr(const py::buffer& b, const char* name, int64_t count, py::ssize_t itemsize, const std::string& what,
                  bool writable) {
  py::buffer_info info = b.request(writable);
  if (info.itemsize != itemsize || info.size != count)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(count) + " items of " +
                                std::to_string(itemsize) + " bytes (" + what + "), got " + std::to_string(info.size) +
                                " of " + std::to_string(info.itemsize));
  if (!c_contiguous(info)) throw std::invalid_argument(std::string(name) + ": expected a C-contiguous buffer");
  return info.ptr;
}

template <typename T>
const T* const_ptr(const py::buffer& b, const char* name, int64_t count, const std::string& what) {
  return static_cast<const T*>(checked_ptr(b, name, count, sizeof(T), what, false));
}

template <typename T>
T* mutable_ptr(const py::buffer& b, const char* name, int64_t count, const std::string& what) {
  return static_cast<T*>(checked_ptr(b, name, count, sizeof(T), what, true));
}

py::dict cpu_info() {
  py::dict d;
  d["simd"] = magicpig::simd_level_name(magicpig::active_simd_level());
  d["simd_supported"] = magicpig::simd_level_name(magicpig::best_supported_simd_level());
  d["omp_max_threads"] = omp_get_max_threads();
  d["omp_num_procs"] = omp_get_num_procs();
  d["block_tokens"] = magicpig::kBlockTokens;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "magicpig C++/OpenMP extension: the CPU store of KV and LSH tables";
  m.def("cpu_info", &cpu_info,
        "dict: simd (level in use), simd_supported (best level of this CPU), omp_max_threads, omp_num_procs, "
        "block_tokens");
  m.def(
      "set_simd", [](const std::string& level) { magicpig::set_simd_level(magicpig::parse_simd_level(level)); },
      py::arg("level"), "Force the SIMD level ('avx512', 'avx2' or 'scalar'; not above what the CPU supports).");

  m.def(
      "simhash_codes",
      [](const py::buffer& x, int H, int64_t n, int d, const py::buffer& projection, int K, int L, py::buffer& codes,
         int num_threads) {
        magicpig::check_simhash_args(H, n, d, K, L, num_threads);
        const float* xp = const_ptr<float>(x, "x", checked_product("x", {H, n, d}), "H * n * d float32");
        const float* pp = const_ptr<float>(projection, "projection", checked_product("projection", {H, d, K, L}),
                                           "H * d * K * L float32");
        int32_t* cp = mutable_ptr<int32_t>(codes, "codes", checked_product("codes", {H, n, L}), "H * n * L int32");
        py::gil_scoped_release release;
        magicpig::simhash_codes(xp, H, n, d, pp, K, L, cp, num_threads);
      },
      py::arg("x"), py::arg("H"), py::arg("n"), py::arg("d"), py::arg("projection"), py::arg("K"), py::arg("L"),
      py::arg("codes"), py::arg("num_threads"),
      "SimHash codes into codes [H, n, L] int32 of x [H, n, d] float32 against projection [H, d, K*L] float32 "
      "(all C-contiguous; sizes and ranges checked: ValueError).");

  py::class_<Store>(m, "Store")
      .def(py::init([](int num_kv_heads, int head_dim, int K, int L, int m_, int dtype, int num_threads,
                       std::vector<float> table, float t_lo, float h, float floor, int exact_keys, bool carry_head) {
             return new Store(num_kv_heads, head_dim, K, L, m_, static_cast<KvDtype>(dtype), num_threads,
                              std::move(table), t_lo, h, floor, exact_keys, carry_head);
           }),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("K"), py::arg("L"), py::arg("min_collisions"),
           py::arg("dtype"), py::arg("num_threads"), py::arg("table"), py::arg("t_lo"), py::arg("h"),
           py::arg("log_u_floor"), py::arg("exact_keys") = 0, py::arg("carry_head") = false)
      .def("add_sequence", &Store::add_sequence)
      // Without the GIL: waits for an append to the source.
      .def("fork", &Store::fork, py::arg("seq_id"), py::arg("tokens"), py::call_guard<py::gil_scoped_release>(),
           "A new sequence seeing the first `tokens` tokens of seq_id, sharing its blocks (zero copy)")
      // Without the GIL: these wait for the append to the sequence they read (remove_sequence
      // also for its attends), which may take long; holding the GIL would stall every thread.
      .def("remove_sequence", &Store::remove_sequence, py::arg("seq_id"),
           py::call_guard<py::gil_scoped_release>())
      .def("has_sequence", &Store::has_sequence, py::arg("seq_id"))
      .def("length", &Store::length, py::arg("seq_id"), py::call_guard<py::gil_scoped_release>())
      .def("nbytes", py::overload_cast<>(&Store::nbytes, py::const_), py::call_guard<py::gil_scoped_release>())
      .def("nbytes_of", py::overload_cast<int64_t>(&Store::nbytes, py::const_), py::arg("seq_id"),
           py::call_guard<py::gil_scoped_release>())
      .def("threads", &Store::threads)
      .def("last_attend_stats", &Store::last_attend_stats,
           "[bucket-list entries walked, candidate rows read, tail tokens scanned, tasks] of the last attend")
      .def("last_append_seconds", &Store::last_append_seconds,
           "[wall seconds copying K/V + norms, wall seconds building bucket lists, CPU seconds building bucket lists] of the last append")
      .def(
          "append",
          [](Store& s, int64_t seq_id, const py::buffer& keys, const py::buffer& values, const py::buffer& codes,
             int64_t t) {
            s.check_append(t);
            const int64_t kv_items = checked_product("keys", {s.num_kv_heads, t, s.head_dim});
            const int kv_bytes = magicpig::kv_itemsize(s.dtype);
            const std::string kv_what = "num_kv_heads * t * head_dim of the store dtype";
            const void* k = checked_ptr(keys, "keys", kv_items, kv_bytes, kv_what, false);
            const void* v = checked_ptr(values, "values", kv_items, kv_bytes, kv_what, false);
            const int64_t code_items = checked_product("key_codes", {s.num_kv_heads, t, s.L});
            const int32_t* c = const_ptr<int32_t>(codes, "key_codes", code_items, "num_kv_heads * t * L int32");
            py::gil_scoped_release release;
            s.append(seq_id, k, v, c, t);
          },
          py::arg("seq_id"), py::arg("keys"), py::arg("values"), py::arg("key_codes"), py::arg("t"))
      .def(
          "read",
          [](const Store& s, int64_t seq_id, int64_t start, int64_t end, py::buffer& keys, py::buffer& values) {
            s.check_read(start, end);  // before sizing the buffers from end - start
            const int64_t items = checked_product("keys", {s.num_kv_heads, end - start, s.head_dim});
            const int kv_bytes = magicpig::kv_itemsize(s.dtype);
            const std::string what = "num_kv_heads * (end - start) * head_dim of the store dtype";
            void* k = checked_ptr(keys, "keys", items, kv_bytes, what, true);
            void* v = checked_ptr(values, "values", items, kv_bytes, what, true);
            py::gil_scoped_release release;
            s.read(seq_id, start, end, k, v);
          },
          py::arg("seq_id"), py::arg("start"), py::arg("end"), py::arg("keys"), py::arg("values"),
          "The stored K/V rows of tokens [start, end) into keys, values [Hkv, end - start, d] of the store dtype")
      .def(
          "attend",
          [](const Store& s, const py::buffer& seq_ids, int B, int Hq, const py::buffer& queries,
             const py::buffer& query_codes, py::buffer& out, py::buffer& lse, py::buffer& ncand) {
            s.check_attend(B, Hq);
            const int64_t rows = static_cast<int64_t>(B) * Hq;
            const int64_t* ids = const_ptr<int64_t>(seq_ids, "seq_ids", B, "B int64");
            const float* q = const_ptr<float>(queries, "queries", checked_product("queries", {rows, s.head_dim}),
                                              "B * Hq * head_dim float32");
            const int32_t* qc = const_ptr<int32_t>(query_codes, "query_codes",
                                                   checked_product("query_codes", {rows, s.L}), "B * Hq * L int32");
            float* o = mutable_ptr<float>(out, "out", checked_product("out", {rows, s.head_dim}),
                                          "B * Hq * head_dim float32");
            float* l = mutable_ptr<float>(lse, "lse", rows, "B * Hq float32");
            int32_t* n = mutable_ptr<int32_t>(ncand, "num_candidates", rows, "B * Hq int32");
            py::gil_scoped_release release;
            s.attend(ids, B, Hq, q, qc, o, l, n);
          },
          py::arg("seq_ids"), py::arg("B"), py::arg("Hq"), py::arg("queries"), py::arg("query_codes"),
          py::arg("out"), py::arg("lse"), py::arg("num_candidates"));
}
