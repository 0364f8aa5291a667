#include "trie.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>

namespace gream {
namespace {

constexpr int kMaxDepth = 255;  // depth is stored in one byte

std::string row_text(const int32_t* row, int32_t len) {
  std::ostringstream s;
  s << '[';
  for (int32_t j = 0; j < len; ++j) s << (j ? ", " : "") << row[j];
  s << ']';
  return s.str();
}

}  // namespace

PrefixTrie::PrefixTrie(const int64_t* seqs, int64_t n, int64_t width) {
  if (n <= 0) throw std::invalid_argument("no sequences: expected at least one row");
  if (n >= std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("too many sequences for int32 item ids");

  // 1. Validate and copy rows to int32, recording lengths.
  std::vector<int32_t> tok(static_cast<size_t>(n * width));
  std::vector<int32_t> len(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = seqs + i * width;
    int64_t l = 0;
    while (l < width && row[l] != -1) {
      const int64_t t = row[l];
      if (t < 0 || t > std::numeric_limits<int32_t>::max()) {
        std::ostringstream m;
        m << "row " << i << ", column " << l << ": token " << t
          << " is out of range (expected 0..2^31-1, or -1 for padding)";
        throw std::invalid_argument(m.str());
      }
      tok[i * width + l] = static_cast<int32_t>(t);
      ++l;
    }
    for (int64_t j = l; j < width; ++j) {
      if (row[j] != -1) {
        std::ostringstream m;
        m << "row " << i << ": padding (-1) at column " << l << " before token " << row[j]
          << " at column " << j << " (padding must come only at the end)";
        throw std::invalid_argument(m.str());
      }
      tok[i * width + j] = -1;
    }
    if (l == 0) {
      std::ostringstream m;
      m << "row " << i << " is empty (every item needs at least one token)";
      throw std::invalid_argument(m.str());
    }
    if (l > kMaxDepth) {
      std::ostringstream m;
      m << "row " << i << " has " << l << " tokens; at most " << kMaxDepth << " are supported";
      throw std::invalid_argument(m.str());
    }
    len[i] = static_cast<int32_t>(l);
    max_depth_ = std::max(max_depth_, static_cast<int32_t>(l));
  }

  // 2. Sort rows lexicographically (-1 padding sorts before any token, so a prefix comes first);
  //    ties by row index keep duplicates adjacent and the order deterministic.
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  const int32_t* T = tok.data();
  const int64_t W = width;
  std::sort(order.begin(), order.end(), [T, W](int32_t a, int32_t b) {
    const int32_t* ra = T + a * W;
    const int32_t* rb = T + b * W;
    for (int64_t j = 0; j < W; ++j)
      if (ra[j] != rb[j]) return ra[j] < rb[j];
    return a < b;
  });

  // 3. Longest common prefix with the previous row in sorted order; equal rows are duplicates.
  std::vector<int32_t> lcp(n, 0);
  for (int64_t s = 1; s < n; ++s) {
    const int32_t* ra = T + order[s - 1] * W;
    const int32_t* rb = T + order[s] * W;
    const int32_t m = std::min(len[order[s - 1]], len[order[s]]);
    int32_t l = 0;
    while (l < m && ra[l] == rb[l]) ++l;
    if (l == len[order[s - 1]] && l == len[order[s]]) {
      std::ostringstream msg;
      msg << "rows " << order[s - 1] << " and " << order[s] << " are the same sequence "
          << row_text(rb, l) << " (each item needs a distinct sequence)";
      throw std::invalid_argument(msg.str());
    }
    lcp[s] = l;
  }

  // 4. Number nodes depth by depth in sorted order: that is breadth-first order with children
  //    sorted by token. A row opens a new node at depth d unless it shares d tokens with the
  //    previous row. cur[s] holds row s's node at the depth being built.
  const int64_t reserve = std::min<int64_t>(n * static_cast<int64_t>(max_depth_) + 1,
                                            std::numeric_limits<int32_t>::max());
  parent_.reserve(reserve);
  node_item_.reserve(reserve);
  depth_.reserve(reserve);
  tokens_.reserve(reserve);
  parent_.push_back(-1);
  node_item_.push_back(-1);
  depth_.push_back(0);
  item_leaf_.assign(n, -1);
  std::vector<int32_t> cur(n, 0);
  std::vector<int32_t> num_children(1, 0);
  for (int32_t d = 1; d <= max_depth_; ++d) {
    for (int64_t s = 0; s < n; ++s) {
      const int32_t row = order[s];
      if (len[row] < d) continue;
      if (lcp[s] >= d) {
        cur[s] = cur[s - 1];  // the previous row reaches depth d too, through the same node
      } else {
        if (node_item_.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max()))
          throw std::invalid_argument("trie too large for int32 node ids");
        const int32_t id = static_cast<int32_t>(node_item_.size());
        parent_.push_back(cur[s]);
        node_item_.push_back(-1);
        depth_.push_back(static_cast<uint8_t>(d));
        tokens_.push_back(T[row * W + d - 1]);
        num_children[cur[s]] += 1;
        num_children.push_back(0);
        cur[s] = id;
      }
      if (len[row] == d) {
        node_item_[cur[s]] = row;
        item_leaf_[row] = cur[s];
      }
    }
  }

  parent_.shrink_to_fit();
  node_item_.shrink_to_fit();
  depth_.shrink_to_fit();
  tokens_.shrink_to_fit();
  edge_begin_.assign(node_item_.size() + 1, 0);
  for (size_t v = 0; v < node_item_.size(); ++v)
    edge_begin_[v + 1] = edge_begin_[v] + num_children[v];
}

int32_t PrefixTrie::walk_seq(const int64_t* seq, int64_t len) const {
  int32_t node = 0;
  for (int64_t j = 0; j < len && seq[j] >= 0 && node >= 0; ++j) node = child(node, seq[j]);
  return node;
}

int32_t PrefixTrie::item_tokens(int32_t item, int32_t* out) const {
  int32_t node = item_leaf_[item];
  const int32_t d = depth_[node];
  for (int32_t j = d - 1; j >= 0; --j) {
    out[j] = token_into(node);
    node = parent_[node];
  }
  return d;
}

size_t PrefixTrie::memory_bytes() const {
  return edge_begin_.capacity() * 4 + tokens_.capacity() * 4 + parent_.capacity() * 4 +
         node_item_.capacity() * 4 + depth_.capacity() + item_leaf_.capacity() * 4;
}

}  // namespace gream
