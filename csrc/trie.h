// Prefix trie over token sequences (one sequence per item), built once and then read-only.
//
// Layout: nodes are numbered in breadth-first order with each node's children sorted by token,
// so the children of node v are the contiguous ids child_begin(v) .. child_end(v) - 1 and edge e
// (an index into tokens_) leads to node e + 1. The CSR "children" array is therefore implicit;
// per node we keep 17 bytes (edge offset, token into it, parent, item, depth) and 4 per item.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace gream {

class PrefixTrie {
 public:
  // seqs: row-major [n, width] int64, -1 padding at the end of a row. Throws std::invalid_argument
  // naming the offending row(s) for a malformed set.
  PrefixTrie(const int64_t* seqs, int64_t n, int64_t width);

  int32_t num_items() const { return static_cast<int32_t>(item_leaf_.size()); }
  int32_t num_nodes() const { return static_cast<int32_t>(node_item_.size()); }
  int32_t max_depth() const { return max_depth_; }

  // Child of `node` along `token`, or -1. `node` may be -1 (a dead row), which stays -1.
  // Inline: it is the inner loop of every batched call.
  inline int32_t child(int32_t node, int64_t token) const;
  int32_t item_of(int32_t node) const { return node < 0 ? -1 : node_item_[node]; }
  int32_t depth_of(int32_t node) const { return depth_[node]; }
  int32_t parent_of(int32_t node) const { return parent_[node]; }
  int32_t leaf_of(int32_t item) const { return item_leaf_[item]; }
  // Token on the edge into `node` (node > 0).
  int32_t token_into(int32_t node) const { return tokens_[node - 1]; }
  int64_t child_begin(int32_t node) const { return edge_begin_[node] + 1; }
  int64_t child_end(int32_t node) const { return edge_begin_[node + 1] + 1; }

  const std::vector<int32_t>& edge_begin() const { return edge_begin_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::vector<int32_t>& node_item() const { return node_item_; }
  const std::vector<int32_t>& parent() const { return parent_; }
  const std::vector<uint8_t>& depth() const { return depth_; }

  // Node reached from the root by seq[0..len), or -1. Stops at the first negative token.
  int32_t walk_seq(const int64_t* seq, int64_t len) const;
  // Writes the item's tokens into out[0..depth) and returns depth.
  int32_t item_tokens(int32_t item, int32_t* out) const;
  size_t memory_bytes() const;

 private:
  std::vector<int32_t> edge_begin_;  // [num_nodes + 1] first edge of each node's children
  std::vector<int32_t> tokens_;      // [num_nodes - 1] token on each edge, sorted per node
  std::vector<int32_t> parent_;      // [num_nodes] parent node (-1 for the root)
  std::vector<int32_t> node_item_;   // [num_nodes] item that ends at the node, or -1
  std::vector<uint8_t> depth_;       // [num_nodes]
  std::vector<int32_t> item_leaf_;   // [num_items] node where each item ends
  int32_t max_depth_ = 0;
};

// Children tokens are sorted and distinct, so a present token t sits at index <= t - first token.
// SID levels usually fill every code, making that index exact: one load, no search. Otherwise a
// branch-free binary search (a conditional move per step; no mispredicted branches, which are
// what a plain lower_bound over 256 random-token children spends its time on).
inline int32_t PrefixTrie::child(int32_t node, int64_t token) const {
  if (node < 0 || token < 0) return -1;
  const int32_t b = edge_begin_[node], e = edge_begin_[node + 1];
  if (b == e) return -1;
  const int32_t* tk = tokens_.data();
  const int64_t off = token - tk[b];
  if (off < 0) return -1;
  int64_t len = std::min<int64_t>(off + 1, e - b);
  if (tk[b + len - 1] == token) return static_cast<int32_t>(b + len);  // edge b+len-1 -> node b+len
  const int32_t* base = tk + b;
  while (len > 1) {
    const int64_t half = len / 2;
    base = (base[half] <= token) ? base + half : base;
    len -= half;
  }
  return (*base == token) ? static_cast<int32_t>(base - tk) + 1 : -1;
}

}  // namespace gream
