// pybind11 module magicpig._C: cpu_info(), the SIMD level switch, SimHash codes and the Store.
// Arrays arrive already validated by magicpig/store (shape, dtype, contiguity, ranges); the
// heavy calls release the GIL.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

#include "dispatch.h"
#include "simhash.h"
#include "store.h"

namespace py = pybind11;
using magicpig::KvDtype;
using magicpig::Store;

namespace {

template <typename T>
T* mutable_ptr(py::buffer& b, const char* name) {
  py::buffer_info info = b.request(true);
  if (info.itemsize != static_cast<py::ssize_t>(sizeof(T)))
    throw std::invalid_argument(std::string(name) + ": wrong item size");
  return static_cast<T*>(info.ptr);
}

template <typename T>
const T* const_ptr(const py::buffer& b, const char* name) {
  py::buffer_info info = b.request();
  if (info.itemsize != static_cast<py::ssize_t>(sizeof(T)))
    throw std::invalid_argument(std::string(name) + ": wrong item size");
  return static_cast<const T*>(info.ptr);
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
        const float* xp = const_ptr<float>(x, "x");
        const float* pp = const_ptr<float>(projection, "projection");
        int32_t* cp = mutable_ptr<int32_t>(codes, "codes");
        py::gil_scoped_release release;
        magicpig::simhash_codes(xp, H, n, d, pp, K, L, cp, num_threads);
      },
      py::arg("x"), py::arg("H"), py::arg("n"), py::arg("d"), py::arg("projection"), py::arg("K"), py::arg("L"),
      py::arg("codes"), py::arg("num_threads"),
      "SimHash codes into codes [H, n, L] int32 of x [H, n, d] float32 against projection [H, d, K*L] float32 "
      "(all C-contiguous; validated by magicpig.lsh.hash_codes).");

  py::class_<Store>(m, "Store")
      .def(py::init([](int num_kv_heads, int head_dim, int K, int L, int m_, int dtype, int num_threads,
                       std::vector<float> table, float t_lo, float h, float floor) {
             return new Store(num_kv_heads, head_dim, K, L, m_, static_cast<KvDtype>(dtype), num_threads,
                              std::move(table), t_lo, h, floor);
           }),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("K"), py::arg("L"), py::arg("min_collisions"),
           py::arg("dtype"), py::arg("num_threads"), py::arg("table"), py::arg("t_lo"), py::arg("h"),
           py::arg("log_u_floor"))
      .def("add_sequence", &Store::add_sequence)
      .def("remove_sequence", &Store::remove_sequence, py::arg("seq_id"))
      .def("has_sequence", &Store::has_sequence, py::arg("seq_id"))
      .def("length", &Store::length, py::arg("seq_id"))
      .def("nbytes", py::overload_cast<>(&Store::nbytes, py::const_))
      .def("nbytes_of", py::overload_cast<int64_t>(&Store::nbytes, py::const_), py::arg("seq_id"))
      .def("threads", &Store::threads)
      .def("last_attend_stats", &Store::last_attend_stats,
           "[bucket-list entries walked, candidate rows read, tail tokens scanned, tasks] of the last attend")
      .def("last_append_seconds", &Store::last_append_seconds,
           "[wall seconds copying K/V + norms, wall seconds building bucket lists, CPU seconds building bucket lists] of the last append")
      .def(
          "append",
          [](Store& s, int64_t seq_id, const py::buffer& keys, const py::buffer& values, const py::buffer& codes,
             int64_t t) {
            const void* k = keys.request().ptr;
            const void* v = values.request().ptr;
            const int32_t* c = const_ptr<int32_t>(codes, "key_codes");
            py::gil_scoped_release release;
            s.append(seq_id, k, v, c, t);
          },
          py::arg("seq_id"), py::arg("keys"), py::arg("values"), py::arg("key_codes"), py::arg("t"))
      .def(
          "attend",
          [](const Store& s, const py::buffer& seq_ids, int B, int Hq, const py::buffer& queries,
             const py::buffer& query_codes, py::buffer& out, py::buffer& lse, py::buffer& ncand) {
            const int64_t* ids = const_ptr<int64_t>(seq_ids, "seq_ids");
            const float* q = const_ptr<float>(queries, "queries");
            const int32_t* qc = const_ptr<int32_t>(query_codes, "query_codes");
            float* o = mutable_ptr<float>(out, "out");
            float* l = mutable_ptr<float>(lse, "lse");
            int32_t* n = mutable_ptr<int32_t>(ncand, "num_candidates");
            py::gil_scoped_release release;
            s.attend(ids, B, Hq, q, qc, o, l, n);
          },
          py::arg("seq_ids"), py::arg("B"), py::arg("Hq"), py::arg("queries"), py::arg("query_codes"),
          py::arg("out"), py::arg("lse"), py::arg("num_candidates"));
}
