// few_row_linear(x [M, K], weight [N, K]) -> x @ weight.T [M, N], fp32 on the CPU, for the few rows a decode
// step verifies (a tree of 1 to 8 nodes). Such a product should cost the weight's streaming time from memory,
// whatever M is; MKL's small-N path does that for 2 rows but turns compute-bound at 3-4 (a 4-node verify of
// SmolLM2 spends 1.5x a 2-node one in its projections; bench/results/cpu_linear_cpu.json).
// Here each pair of weight rows is read from memory once and multiplied with up to 4 input rows at a time while
// it sits in registers and L1 (a compile-time block of R rows keeps the 2R accumulators in registers).
// AVX2 + FMA where the CPU has them (chosen at run time; the extension is built without -mavx2); elsewhere the op
// is ATen's GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)  // GCC / clang: target attributes, cpu checks
#include <immintrin.h>
#define SDALIGN_RT_X86 1
#endif

namespace sdalign_rt {
namespace {

void rows_scalar(const float* x, const float* w, float* out, int64_t m, int64_t k, int64_t n_begin, int64_t n_end,
                 int64_t n_total) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* wn = w + n * k;
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * k;
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += xi[j] * wn[j];
      out[i * n_total + n] = acc;
    }
  }
}

#ifdef SDALIGN_RT_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Weight rows (w0, w1) against input rows x[0..R): 2R accumulators in registers. k % 8 == 0 here; the caller
// handles a ragged tail.
template <int R>
__attribute__((target("avx2,fma"))) inline void pair_block(const float* x, int64_t k, const float* w0,
                                                           const float* w1, int64_t k8, float* s0, float* s1) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < k8; j += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + j + 2 * k), _MM_HINT_T0);  // the next pair's rows
    _mm_prefetch(reinterpret_cast<const char*>(w1 + j + 2 * k), _MM_HINT_T0);
    const __m256 v0 = _mm256_loadu_ps(w0 + j), v1 = _mm256_loadu_ps(w1 + j);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + j);
      a0[r] = _mm256_fmadd_ps(xv, v0, a0[r]);
      a1[r] = _mm256_fmadd_ps(xv, v1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    s0[r] = hsum(a0[r]);
    s1[r] = hsum(a1[r]);
  }
}

__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const float* w, float* out, int64_t m,
                                                   int64_t k, int64_t n_begin, int64_t n_end, int64_t n_total) {
  const int64_t k8 = k - k % 8;
  float s0[4], s1[4];
  int64_t n = n_begin;
  for (; n + 1 < n_end; n += 2) {
    const float* w0 = w + n * k;
    const float* w1 = w0 + k;
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
      const int64_t rows = std::min<int64_t>(4, m - i0);
      const float* xb = x + i0 * k;
      switch (rows) {
        case 4: pair_block<4>(xb, k, w0, w1, k8, s0, s1); break;
        case 3: pair_block<3>(xb, k, w0, w1, k8, s0, s1); break;
        case 2: pair_block<2>(xb, k, w0, w1, k8, s0, s1); break;
        default: pair_block<1>(xb, k, w0, w1, k8, s0, s1); break;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* xi = xb + r * k;
        for (int64_t j = k8; j < k; ++j) {
          s0[r] += xi[j] * w0[j];
          s1[r] += xi[j] * w1[j];
        }
        out[(i0 + r) * n_total + n] = s0[r];
        out[(i0 + r) * n_total + n + 1] = s1[r];
      }
    }
  }
  if (n < n_end) rows_scalar(x, w, out, m, k, n, n_end, n_total);  // an odd row left over
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

at::Tensor few_row_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "few_row_linear: x [M, K] and weight [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "few_row_linear: fp32 only");
  TORCH_CHECK(x.size(1) == weight.size(1), "few_row_linear: x has ", x.size(1), " columns, weight ", weight.size(1));
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "few_row_linear: CPU tensors only");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
#ifdef SDALIGN_RT_X86
  const bool vector = has_avx2();
#else
  const bool vector = false;
#endif
  // The scalar loop is for odd rows only: without AVX2 + FMA (older x86, ARM) ATen's GEMM is the fast one.
  if (!vector) return at::mm(xc, wc.t());
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  at::Tensor out = at::empty({m, n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Each thread streams one contiguous range of weight rows (an even count: the kernel pairs them).
  const int64_t pairs = (n + 1) / 2;
  at::parallel_for(0, pairs, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * 2, n1 = std::min(end * 2, n);
#ifdef SDALIGN_RT_X86
    rows_avx2(xp, wp, op, m, k, n0, n1, n);
#else
    rows_scalar(xp, wp, op, m, k, n0, n1, n);
#endif
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdalign_rt, m) {
  m.def("few_row_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdalign_rt, CPU, m) {
  m.impl("few_row_linear", &few_row_linear);
}

}  // namespace sdalign_rt
