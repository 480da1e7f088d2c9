// Kernel bodies of mdpo::logprobs_forward / logprobs_backward for one instruction set.
//
// Not a normal header: logprobs_kernel{,_avx2,_avx512}.cpp each define CPU_CAPABILITY (the
// namespace name, as in ATen) and, when built with that ISA's compiler flags, CPU_CAPABILITY_AVX2 or
// CPU_CAPABILITY_AVX512 before including it, so at::vec::Vectorized<float> is 8 fp32 lanes (DEFAULT,
// AVX2) or 16 (AVX512). Code in the AVX copies may run only after logprobs_cpu.cpp has checked the
// CPU, so this file must not define namespace-scope data with a dynamic initialiser.
//
// Maths, per supervised position p with logits x = x[p, 0:V], target y, upstream gradient g:
//   forward : lse = m + log Σ_v exp(x_v − m)   (m = running maximum; online over vocabulary blocks)
//             logp = x_y − lse
//   backward: grad_v = g · (1[v = y] − exp(x_v − lse))
// Memory traffic: the forward reads each supervised row once from memory (its second pass over a
// block hits L1) and writes 2 floats; the backward reads it once more and writes it once.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "logprobs_cpu.h"

#ifndef MDPO_ISA_ENABLED
#error "include logprobs_kernel.h only from logprobs_kernel{,_avx2,_avx512}.cpp"
#endif

namespace mdpo::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();  // fp32 lanes: 16 (AVX512) or 8
// One step = two fp32 vectors = one Vectorized<bf16/fp16>, so every storage dtype moves in the same unit.
constexpr int64_t kStep = 2 * kLanes;
// Vocabulary block of the online log-sum-exp: 2048 fp32 = 8 KiB (4 KiB in bf16), so the block's
// second pass (the exps) reads L1, not memory. A multiple of kStep, so only the last block has a tail.
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kStep == 0, "the vocabulary block must be a whole number of steps");

// Positions per parallel task: at least ~64K logits, so small problems stay on one thread.
inline int64_t grain_positions(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, vocab)); }

// Load / store kStep elements of storage type T as two fp32 vectors.
template <typename T>
struct Io {  // bf16 and fp16: one 16-bit vector <-> two fp32 vectors
  using VecT = at::vec::Vectorized<T>;
  static_assert(VecT::size() == kStep, "one 16-bit vector must hold two fp32 vectors");
  static inline void load(const T* p, Vec& a, Vec& b) { std::tie(a, b) = at::vec::convert_to_float<T>(VecT::loadu(p)); }
  static inline void store(T* p, const Vec& a, const Vec& b) { at::vec::convert_from_float<T>(a, b).store(p); }
};
template <>
struct Io<float> {
  static inline void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kLanes);
  }
  static inline void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kLanes);
  }
};

// exp(v) for v ≤ 0 (every argument here is x − max or x − lse). ATen's exp_u20 (range reduction
// plus a degree-5 polynomial, error ≤ 20 ulp ≈ 2.4e-6 relative) is cheaper than Sleef's 1-ulp exp;
// it flushes arguments below ln(FLT_MIN), −inf included, to 0, which is what the sums want. It does
// not propagate NaN, so row_logsumexp tracks NaN itself. The DEFAULT build maps std::exp.
inline Vec exp_nonpositive(const Vec& v) { return v.exp_u20(); }

// log Σ_v exp(x_v) over one row of V logits, fp32 accumulation.
// Online over blocks: pass 1 takes the block maximum b; if b > m the running sum is rescaled by
// exp(m − b) once; pass 2 adds exp(x − m) for the block. One exp per logit, one read from memory.
template <typename T>
float row_logsumexp(const T* x, int64_t vocab) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf;
  bool saw_nan = false;  // exp_u20 does not propagate NaN, so it is tracked through the maximum
  Vec sum0(0.f), sum1(0.f);
  float sum_tail = 0.f;
  for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
    const T* xb = x + b0;
    const int64_t n = std::min(kBlock, vocab - b0);
    const int64_t n_vec = n - n % kStep;
    // Pass 1: block maximum (at::vec::maximum propagates NaN).
    Vec mx0(kNegInf), mx1(kNegInf);
    for (int64_t i = 0; i < n_vec; i += kStep) {
      Vec a, b;
      Io<T>::load(xb + i, a, b);
      mx0 = at::vec::maximum(mx0, a);
      mx1 = at::vec::maximum(mx1, b);
    }
    float block_max = at::vec::vec_reduce_all<float>(
        [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, at::vec::maximum(mx0, mx1));
    for (int64_t i = n_vec; i < n; ++i) {
      const float v = static_cast<float>(xb[i]);
      block_max = (v > block_max || std::isnan(v)) ? v : block_max;
    }
    if (std::isnan(block_max)) {
      saw_nan = true;
      continue;
    }
    if (block_max > m) {  // new maximum: rescale what was summed so far, Σ exp(x − m_old) · exp(m_old − m_new)
      const float scale = std::exp(m - block_max);  // exp(−inf) = 0 on the first block
      sum0 = sum0 * Vec(scale);
      sum1 = sum1 * Vec(scale);
      sum_tail *= scale;
      m = block_max;
    }
    if (m == kNegInf) continue;  // all −inf so far: nothing to add
    // Pass 2: Σ exp(x − m) over the block, from L1.
    const Vec vm(m);
    for (int64_t i = 0; i < n_vec; i += kStep) {
      Vec a, b;
      Io<T>::load(xb + i, a, b);
      sum0 = sum0 + exp_nonpositive(a - vm);
      sum1 = sum1 + exp_nonpositive(b - vm);
    }
    for (int64_t i = n_vec; i < n; ++i) sum_tail += std::exp(static_cast<float>(xb[i]) - m);
  }
  if (saw_nan) return std::numeric_limits<float>::quiet_NaN();
  const float total = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, sum0 + sum1) + sum_tail;
  return m + std::log(total);  // all −inf: −inf + log 0 = −inf, as torch.logsumexp
}

// grad[v] = g · (1[v = y] − exp(x_v − lse)) over one row. `grad` may alias `x` (in place): every
// element is read before it is written, and x_y is read before the loop.
template <typename T>
void row_grad(const T* x, T* grad, int64_t vocab, int64_t y, float lse, float g) {
  const float x_y = static_cast<float>(x[y]);
  const int64_t n_vec = vocab - vocab % kStep;
  const Vec vlse(lse), neg_g(-g);
  for (int64_t i = 0; i < n_vec; i += kStep) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    Io<T>::store(grad + i, exp_nonpositive(a - vlse) * neg_g, exp_nonpositive(b - vlse) * neg_g);
  }
  for (int64_t i = n_vec; i < vocab; ++i) grad[i] = static_cast<T>(-g * std::exp(static_cast<float>(x[i]) - lse));
  grad[y] = static_cast<T>(g * (1.f - std::exp(x_y - lse)));
}

template <typename T>
void forward_typed(const ForwardArgs& a) {
  const T* logits = static_cast<const T*>(a.logits);
  at::parallel_for(0, a.n_positions, grain_positions(a.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t p = a.positions[k];
      const int64_t r = p / a.positions_per_row, t = p % a.positions_per_row;
      const T* x = logits + r * a.stride_r + t * a.stride_t;
      const float lse = row_logsumexp(x, a.vocab);
      a.lse[p] = lse;
      a.token_logp[p] = static_cast<float>(x[a.target[p]]) - lse;
    }
  });
}

template <typename T>
void backward_typed(const BackwardArgs& a) {
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  at::parallel_for(0, a.n_positions, grain_positions(a.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t p = a.positions[k];
      const int64_t r = p / a.positions_per_row, t = p % a.positions_per_row;
      row_grad(logits + r * a.stride_r + t * a.stride_t, grad + r * a.grad_stride_r + t * a.grad_stride_t,
               a.vocab, a.target[p], a.lse[p], a.grad_logps[r]);
    }
  });
}

}  // namespace

bool isa_enabled() { return MDPO_ISA_ENABLED; }

void forward_kernel(const ForwardArgs& args) {
  switch (args.storage) {
    case Storage::kFloat: return forward_typed<float>(args);
    case Storage::kBFloat16: return forward_typed<c10::BFloat16>(args);
    case Storage::kHalf: return forward_typed<c10::Half>(args);
  }
}

void backward_kernel(const BackwardArgs& args) {
  switch (args.storage) {
    case Storage::kFloat: return backward_typed<float>(args);
    case Storage::kBFloat16: return backward_typed<c10::BFloat16>(args);
    case Storage::kHalf: return backward_typed<c10::Half>(args);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace mdpo::cpu
