// CPU implementations of the host-side tree ops: build_tree, verify_tree_greedy, verify_tree_sampling and
// the slot indices of kv_compact. Input is validated in Python (sdalign_rt/checks.py); these assume trees
// whose parents precede their children, so one forward pass over the nodes computes depths and ancestors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <vector>

namespace sdalign_rt {
namespace {

std::vector<int64_t> depths_of(const int64_t* parents, int64_t n) {
  std::vector<int64_t> depth(n, 0);
  for (int64_t i = 1; i < n; ++i) depth[i] = depth[parents[i]] + 1;
  return depth;
}

int64_t max_tree_depth(const at::Tensor& parents) {
  const int64_t batch = parents.size(0), n = parents.size(1);
  const int64_t* p = parents.data_ptr<int64_t>();
  int64_t best = 0;
  for (int64_t b = 0; b < batch; ++b) {
    auto depth = depths_of(p + b * n, n);
    best = std::max(best, *std::max_element(depth.begin(), depth.end()));
  }
  return best;
}

// Writes the root-to-node path of `node` into out[0:width], padded with -1.
void write_path(const int64_t* parents, const std::vector<int64_t>& depth, int64_t node, int64_t* out,
                int64_t width) {
  std::fill(out, out + width, -1);
  for (int64_t v = node; v != -1; v = parents[v]) out[depth[v]] = v;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree(const at::Tensor& parents_in,
                                                                                   const at::Tensor& prefix_in) {
  const at::Tensor parents = parents_in.to(at::kLong).contiguous();
  const at::Tensor prefix = prefix_in.to(at::kLong).contiguous();
  const int64_t batch = parents.size(0), n = parents.size(1), words = (n + 31) / 32;
  auto long_opts = parents.options().dtype(at::kLong);
  at::Tensor depth = at::empty({batch, n}, long_opts);
  at::Tensor positions = at::empty({batch, n}, long_opts);
  at::Tensor mask = at::zeros({batch, 1, n, n}, parents.options().dtype(at::kBool));
  at::Tensor bitmask = at::zeros({batch, n, words}, parents.options().dtype(at::kInt));
  std::vector<int64_t> n_leaves(batch, 0);
  const int64_t* p = parents.data_ptr<int64_t>();
  const int64_t* pre = prefix.data_ptr<int64_t>();
  int64_t* d = depth.data_ptr<int64_t>();
  int64_t* pos = positions.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();
  uint32_t* bits = reinterpret_cast<uint32_t*>(bitmask.data_ptr<int32_t>());

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* row = p + b * n;
      bool* mb = m + b * n * n;
      uint32_t* wb = bits + b * n * words;
      auto dep = depths_of(row, n);
      std::vector<bool> has_child(n, false);
      for (int64_t i = 0; i < n; ++i) {
        d[b * n + i] = dep[i];
        pos[b * n + i] = pre[b] + dep[i];
        if (i > 0) {  // a node sees what its parent sees, plus itself
          has_child[row[i]] = true;
          std::copy(mb + row[i] * n, mb + row[i] * n + n, mb + i * n);
          std::copy(wb + row[i] * words, wb + row[i] * words + words, wb + i * words);
        }
        mb[i * n + i] = true;
        wb[i * words + i / 32] |= (1u << (i % 32));
      }
      n_leaves[b] = std::count(has_child.begin(), has_child.end(), false);
    }
  });

  const int64_t max_leaves = *std::max_element(n_leaves.begin(), n_leaves.end());
  const int64_t width = max_tree_depth(parents) + 1;
  at::Tensor retrieve = at::full({batch, max_leaves, width}, -1, long_opts);
  int64_t* r = retrieve.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = p + b * n;
    auto dep = depths_of(row, n);
    std::vector<bool> has_child(n, false);
    for (int64_t i = 1; i < n; ++i) has_child[row[i]] = true;
    int64_t rank = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (has_child[i]) continue;
      write_path(row, dep, i, r + (b * max_leaves + rank) * width, width);
      ++rank;
    }
  }
  return {positions, mask, bitmask, retrieve, depth};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy(const at::Tensor& draft_in,
                                                                  const at::Tensor& parents_in,
                                                                  const at::Tensor& argmax_in) {
  const at::Tensor parents = parents_in.to(at::kLong).contiguous();
  const at::Tensor draft = draft_in.to(at::kLong).contiguous();
  const at::Tensor argmax = argmax_in.to(at::kLong).contiguous();
  const int64_t batch = parents.size(0), n = parents.size(1);
  const int64_t width = max_tree_depth(parents) + 1;
  auto opts = parents.options().dtype(at::kLong);
  at::Tensor accept_nodes = at::empty({batch, width}, opts);
  at::Tensor accept_len = at::empty({batch}, opts);
  at::Tensor bonus = at::empty({batch}, opts);
  const int64_t *p = parents.data_ptr<int64_t>(), *tok = draft.data_ptr<int64_t>(), *am = argmax.data_ptr<int64_t>();
  int64_t *out = accept_nodes.data_ptr<int64_t>(), *len = accept_len.data_ptr<int64_t>(), *bon = bonus.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t *row = p + b * n, *t = tok + b * n, *a = am + b * n;
      auto dep = depths_of(row, n);
      std::vector<bool> accepted(n, false);
      accepted[0] = true;
      int64_t best = 0;
      for (int64_t i = 1; i < n; ++i) {
        accepted[i] = accepted[row[i]] && t[i] == a[row[i]];
        if (accepted[i] && dep[i] > dep[best]) best = i;  // strict: ties keep the lowest index
      }
      write_path(row, dep, best, out + b * width, width);
      len[b] = dep[best] + 1;
      bon[b] = a[best];
    }
  });
  return {accept_nodes, accept_len, bonus};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_sampling(const at::Tensor& draft_in,
                                                                    const at::Tensor& parents_in,
                                                                    const at::Tensor& probs_in,
                                                                    const at::Tensor& uniform_in) {
  const at::Tensor parents = parents_in.to(at::kLong).contiguous();
  const at::Tensor draft = draft_in.to(at::kLong).contiguous();
  const at::Tensor probs = probs_in.to(at::kFloat).contiguous();
  const at::Tensor uniform = uniform_in.to(at::kFloat).contiguous();
  const int64_t batch = parents.size(0), n = parents.size(1), vocab = probs.size(2);
  const int64_t width = max_tree_depth(parents) + 1;
  auto opts = parents.options().dtype(at::kLong);
  at::Tensor accept_nodes = at::empty({batch, width}, opts);
  at::Tensor accept_len = at::empty({batch}, opts);
  at::Tensor bonus = at::empty({batch}, opts);
  const int64_t *p = parents.data_ptr<int64_t>(), *tok = draft.data_ptr<int64_t>();
  const float *q = probs.data_ptr<float>(), *u = uniform.data_ptr<float>();
  int64_t *out = accept_nodes.data_ptr<int64_t>(), *len = accept_len.data_ptr<int64_t>(), *bon = bonus.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t *row = p + b * n, *t = tok + b * n;
      const float* coins = u + b * n;
      auto dep = depths_of(row, n);
      int64_t node = 0;
      std::vector<float> weights(q + b * n * vocab, q + b * n * vocab + vocab);
      float mass = 0.f;
      for (float w : weights) mass += w;
      for (int64_t child = 1; child < n; ++child) {
        if (row[child] != node) continue;
        const float w = weights[t[child]];
        if (coins[child] * mass < w) {  // accepted with probability w / mass
          node = child;
          const float* next = q + (b * n + child) * vocab;
          weights.assign(next, next + vocab);
          mass = 0.f;
          for (float v : weights) mass += v;
        } else {
          weights[t[child]] = 0.f;
          mass -= w;
        }
      }
      write_path(row, dep, node, out + b * width, width);
      len[b] = dep[node] + 1;
      const float target = coins[0] * mass;
      float running = 0.f;
      int64_t pick = -1, last_positive = -1;
      for (int64_t v = 0; v < vocab; ++v) {
        running += weights[v];
        if (weights[v] > 0.f) last_positive = v;
        if (running > target) {
          pick = v;
          break;
        }
      }
      // No positive weight (a nan or all-zero row): token 0, never a negative id.
      bon[b] = pick >= 0 ? pick : (last_positive >= 0 ? last_positive : 0);
    }
  });
  return {accept_nodes, accept_len, bonus};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_compact_indices(const at::Tensor& accept_in,
                                                                  const at::Tensor& prefix_in) {
  const at::Tensor accept = accept_in.to(at::kLong).contiguous();
  const at::Tensor prefix = prefix_in.to(at::kLong).contiguous();
  const int64_t batch = accept.size(0), width = accept.size(1);
  at::Tensor src = at::empty({batch, width}, accept.options());
  at::Tensor dst = at::empty({batch, width}, accept.options());
  at::Tensor new_len = at::empty({batch}, accept.options());
  const int64_t *a = accept.data_ptr<int64_t>(), *pre = prefix.data_ptr<int64_t>();
  int64_t *s = src.data_ptr<int64_t>(), *d = dst.data_ptr<int64_t>(), *nl = new_len.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    int64_t count = 0;
    for (int64_t k = 0; k < width; ++k) {
      const int64_t node = a[b * width + k];
      const bool valid = node >= 0;
      s[b * width + k] = valid ? pre[b] + node : -1;
      d[b * width + k] = valid ? pre[b] + k : -1;
      count += valid;
    }
    nl[b] = pre[b] + count;
  }
  return {src, dst, new_len};
}

// In-place move on a [C, B, H, S, Dh] cache whose last dim is contiguous: for each (c, b, h) row sequence,
// slot prefix + node_k -> slot prefix + k in increasing k. node_k >= k, so no move reads a slot that an
// earlier move of the same sequence overwrote.
at::Tensor kv_compact_(at::Tensor cache, const at::Tensor& accept_in, const at::Tensor& prefix_in) {
  TORCH_CHECK(cache.dim() == 5 && cache.stride(4) == 1, "kv_compact_: cache must be [C, B, H, S, Dh] with contiguous Dh");
  auto [src, dst, new_len] = kv_compact_indices(accept_in, prefix_in);
  const int64_t caches = cache.size(0), batch = cache.size(1), heads = cache.size(2), width = src.size(1);
  const int64_t row_bytes = cache.size(4) * cache.element_size();
  const int64_t item = cache.element_size();
  const int64_t sc = cache.stride(0) * item, sb = cache.stride(1) * item, sh = cache.stride(2) * item,
                ss = cache.stride(3) * item;
  char* base = static_cast<char*>(cache.data_ptr());
  const int64_t *s = src.data_ptr<int64_t>(), *d = dst.data_ptr<int64_t>();
  at::parallel_for(0, caches * batch * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i % heads, b = (i / heads) % batch, c = i / (heads * batch);
      char* seq = base + c * sc + b * sb + h * sh;
      for (int64_t k = 0; k < width; ++k) {
        const int64_t from = s[b * width + k], to = d[b * width + k];
        if (from >= 0 && from != to) std::memmove(seq + to * ss, seq + from * ss, row_bytes);
      }
    }
  });
  return new_len;
}

TORCH_LIBRARY(sdalign_rt, m) {
  m.def("build_tree(Tensor parents, Tensor prefix_len) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("verify_tree_greedy(Tensor draft_tokens, Tensor parents, Tensor target_argmax) -> (Tensor, Tensor, Tensor)");
  m.def(
      "verify_tree_sampling(Tensor draft_tokens, Tensor parents, Tensor target_probs, Tensor uniform)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("kv_compact_indices(Tensor accept_nodes, Tensor prefix_len) -> (Tensor, Tensor, Tensor)");
  m.def("kv_compact_(Tensor(a!) cache, Tensor accept_nodes, Tensor prefix_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdalign_rt, CPU, m) {
  m.impl("build_tree", &build_tree);
  m.impl("verify_tree_greedy", &verify_tree_greedy);
  m.impl("verify_tree_sampling", &verify_tree_sampling);
  m.impl("kv_compact_indices", &kv_compact_indices);
  m.impl("kv_compact_", &kv_compact_);
}

}  // namespace sdalign_rt
