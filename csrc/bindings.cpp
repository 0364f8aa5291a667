// Python bindings for gream::PrefixTrie. Batched calls take numpy arrays, run without the GIL
// and never loop per row in Python. gream_fast.index.PrefixTrie wraps this with validation and
// GreamError messages; use that, not this module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "trie.h"

namespace py = pybind11;
using gream::PrefixTrie;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style>;

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

void check_2d(const I64Array& a, const char* what) {
  if (a.ndim() != 2) {
    std::ostringstream m;
    m << what << " must be a 2-D array [rows, tokens], got " << a.ndim() << " dimension(s)";
    throw std::invalid_argument(m.str());
  }
}

// Node ids outside [-1, num_nodes) raise IndexError naming the first bad position. The check
// rides along in the main loop; the error is raised after it.
[[noreturn]] void bad_node(const PrefixTrie& t, int64_t i, int64_t node) {
  std::ostringstream m;
  m << "nodes[" << i << "] = " << node << " is not a node id (expected -1 or 0.."
    << t.num_nodes() - 1 << ")";
  throw py::index_error(m.str());
}

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

// Batched calls take int32 or int64 arrays as they are (node ids come back from walk as int32
// and go straight into the next walk: no conversion copy per decode step).
template <typename N, typename K>
I32Array walk(const PrefixTrie& t, const Array<N>& nodes, const Array<K>& tokens) {
  if (nodes.size() != tokens.size()) {
    std::ostringstream m;
    m << "nodes and tokens must have the same size, got " << nodes.size() << " and "
      << tokens.size();
    throw std::invalid_argument(m.str());
  }
  const int64_t n = nodes.size();
  const N* pn = nodes.data();
  const K* pt = tokens.data();
  I32Array out(std::vector<py::ssize_t>(nodes.shape(), nodes.shape() + nodes.ndim()));
  int32_t* po = out.mutable_data();
  int64_t bad = -1;
  {
    py::gil_scoped_release nogil;
    const int64_t limit = t.num_nodes();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = pn[i];
      if (v < -1 || v >= limit) {
        bad = i;
        break;
      }
      po[i] = t.child(static_cast<int32_t>(v), static_cast<int64_t>(pt[i]));
    }
  }
  if (bad >= 0) bad_node(t, bad, pn[bad]);
  return out;
}

template <typename N>
I32Array item_of(const PrefixTrie& t, const Array<N>& nodes) {
  const int64_t n = nodes.size();
  const N* pn = nodes.data();
  I32Array out(std::vector<py::ssize_t>(nodes.shape(), nodes.shape() + nodes.ndim()));
  int32_t* po = out.mutable_data();
  int64_t bad = -1;
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = pn[i];
      if (v < -1 || v >= t.num_nodes()) {
        bad = i;
        break;
      }
      po[i] = t.item_of(static_cast<int32_t>(v));
    }
  }
  if (bad >= 0) bad_node(t, bad, pn[bad]);
  return out;
}

I32Array lookup(const PrefixTrie& t, const I64Array& seqs) {
  check_2d(seqs, "seqs");
  const int64_t m = seqs.shape(0), w = seqs.shape(1);
  const int64_t* ps = seqs.data();
  I32Array out(m);
  int32_t* po = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < m; ++i) {
      // Exactly an item: tokens, then only -1 padding. Any other negative value, or a token
      // after the padding, is not an item.
      const int64_t* row = ps + i * w;
      int64_t len = 0;
      while (len < w && row[len] >= 0) ++len;
      bool clean = true;
      for (int64_t j = len; j < w; ++j) clean &= row[j] == -1;
      po[i] = clean ? t.item_of(t.walk_seq(row, len)) : -1;
    }
  }
  return out;
}

I32Array common_prefix(const PrefixTrie& t, const I64Array& seqs, const I64Array& items) {
  check_2d(seqs, "seqs");
  const int64_t m = seqs.shape(0), w = seqs.shape(1);
  if (items.ndim() != 1 || items.shape(0) != m) {
    std::ostringstream s;
    s << "items must be a 1-D array with one item per row of seqs (" << m << "), got shape [";
    for (py::ssize_t d = 0; d < items.ndim(); ++d) s << (d ? ", " : "") << items.shape(d);
    s << "]";
    throw std::invalid_argument(s.str());
  }
  const int64_t* ps = seqs.data();
  const int64_t* pi = items.data();
  I32Array out(m);
  int32_t* po = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < m; ++i) {
      if (pi[i] < 0 || pi[i] >= t.num_items()) {
        std::ostringstream s;
        s << "items[" << i << "] = " << pi[i] << " is not an item id (expected 0.."
          << t.num_items() - 1 << ")";
        throw py::index_error(s.str());
      }
    }
    std::vector<int32_t> target(t.max_depth());
    for (int64_t i = 0; i < m; ++i) {
      const int32_t d = t.item_tokens(static_cast<int32_t>(pi[i]), target.data());
      const int64_t* row = ps + i * w;
      int32_t l = 0;
      while (l < d && l < w && row[l] == target[l]) ++l;
      po[i] = l;
    }
  }
  return out;
}

I32Array allowed(const PrefixTrie& t, const I64Array& prefix) {
  if (prefix.ndim() != 1) throw std::invalid_argument("prefix must be a 1-D sequence of tokens");
  const int32_t node = t.walk_seq(prefix.data(), prefix.size());
  // A negative token inside the prefix ends the walk early; such a prefix is not a node.
  for (py::ssize_t j = 0; j < prefix.size(); ++j)
    if (prefix.data()[j] < 0) return I32Array(0);
  if (node < 0) return I32Array(0);
  const int64_t b = t.child_begin(node) - 1, e = t.child_end(node) - 1;
  I32Array out(e - b);
  std::copy(t.tokens().begin() + b, t.tokens().begin() + e, out.mutable_data());
  return out;
}

I32Array sequences(const PrefixTrie& t) {
  const int64_t n = t.num_items(), w = t.max_depth();
  I32Array out({n, w});
  int32_t* po = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::fill(po, po + n * w, -1);
    for (int64_t i = 0; i < n; ++i) t.item_tokens(static_cast<int32_t>(i), po + i * w);
  }
  return out;
}

py::dict arrays(const PrefixTrie& t) {
  py::dict d;
  d["indptr"] = to_numpy(t.edge_begin());
  d["tokens"] = to_numpy(t.tokens());
  I32Array children(static_cast<py::ssize_t>(t.tokens().size()));
  std::iota(children.mutable_data(), children.mutable_data() + children.size(), 1);
  d["children"] = children;
  d["node_item"] = to_numpy(t.node_item());
  d["parent"] = to_numpy(t.parent());
  I32Array depth(t.num_nodes());
  std::copy(t.depth().begin(), t.depth().end(), depth.mutable_data());
  d["node_depth"] = depth;
  return d;
}

std::unique_ptr<PrefixTrie> build(const I64Array& seqs) {
  check_2d(seqs, "seqs");
  const int64_t* p = seqs.data();
  const int64_t n = seqs.shape(0), w = seqs.shape(1);
  py::gil_scoped_release nogil;
  return std::make_unique<PrefixTrie>(p, n, w);
}

}  // namespace

PYBIND11_MODULE(_trie, m) {
  m.doc() = "C++ prefix trie over token sequences (use gream_fast.index.PrefixTrie)";
  py::class_<PrefixTrie>(m, "PrefixTrie")
      .def(py::init(&build), py::arg("seqs"))
      .def_property_readonly("num_items", &PrefixTrie::num_items)
      .def_property_readonly("num_nodes", &PrefixTrie::num_nodes)
      .def_property_readonly("max_depth", &PrefixTrie::max_depth)
      .def("memory_bytes", &PrefixTrie::memory_bytes)
      .def("allowed", &allowed, py::arg("prefix"))
      // Exact dtypes first (no copy); the int64 forcecast overload catches everything else.
      .def("walk", &walk<int32_t, int32_t>, py::arg("nodes"), py::arg("tokens"))
      .def("walk", &walk<int32_t, int64_t>, py::arg("nodes"), py::arg("tokens"))
      .def("walk", &walk<int64_t, int32_t>, py::arg("nodes"), py::arg("tokens"))
      .def("walk", [](const PrefixTrie& t, const I64Array& n, const I64Array& k) {
        return walk<int64_t, int64_t>(t, n, k);
      }, py::arg("nodes"), py::arg("tokens"))
      .def("item_of", &item_of<int32_t>, py::arg("nodes"))
      .def("item_of", [](const PrefixTrie& t, const I64Array& n) { return item_of<int64_t>(t, n); },
           py::arg("nodes"))
      .def("lookup", &lookup, py::arg("seqs"))
      .def("common_prefix", &common_prefix, py::arg("seqs"), py::arg("items"))
      .def("sequences", &sequences)
      .def("arrays", &arrays);
}
