// Shared declarations of the C++ CPU kernels of `sequence_logprobs` (see logprobs_cpu.cpp).
//
// The kernels live in logprobs_kernel.h, compiled once per instruction set by logprobs_kernel.cpp,
// logprobs_kernel_avx2.cpp and logprobs_kernel_avx512.cpp into mdpo::cpu::{DEFAULT,AVX2,AVX512};
// logprobs_cpu.cpp picks one at run time from torch's own CPU capability. The structs below are
// plain data on purpose: the AVX files see no at::Tensor, only pointers, sizes and strides.
#pragma once

#include <cstdint>

namespace mdpo::cpu {

enum class Storage : int { kFloat, kBFloat16, kHalf };  // dtype of the logits (math is always fp32)

// One call of the forward kernel: the log-sum-exp and target log-prob of `n_positions` positions.
struct ForwardArgs {
  const void* logits;          // (R, T, V), element strides (stride_r, stride_t, 1)
  Storage storage;
  int64_t positions_per_row;   // T
  int64_t vocab;               // V
  int64_t stride_r, stride_t;  // in elements
  const int64_t* positions;    // flat indices p = r·T + t of the supervised positions, n_positions of them
  int64_t n_positions;
  const int64_t* target;       // (R·T) contiguous, already validated: 0 ≤ target[p] < V at every listed p
  float* lse;                  // (R·T) out: log Σ_v exp(x[p, v]) at the listed positions
  float* token_logp;           // (R·T) out: x[p, target[p]] − lse[p] at the listed positions
};

// One call of the backward kernel: grad[p, :] = g[r] · (onehot(target[p]) − softmax(x[p, :])).
struct BackwardArgs {
  const void* logits;          // (R, T, V), strides as in ForwardArgs
  void* grad;                  // (R, T, V) out, same dtype; may be `logits` itself (in place)
  Storage storage;
  int64_t positions_per_row, vocab;
  int64_t stride_r, stride_t;            // of logits, in elements
  int64_t grad_stride_r, grad_stride_t;  // of grad, in elements
  const int64_t* positions;    // supervised positions only; the caller zeroes the others
  int64_t n_positions;
  const int64_t* target;       // (R·T) contiguous
  const float* lse;            // (R·T) contiguous, from the forward
  const float* grad_logps;     // (R,) upstream gradient of the per-sequence sums
};

// One set per instruction set. `isa_enabled()` is false when the compiler could not target it
// (then that namespace holds the portable code and is never chosen).
#define MDPO_DECLARE_KERNELS(ISA)                 \
  namespace ISA {                                 \
  bool isa_enabled();                             \
  void forward_kernel(const ForwardArgs& args);   \
  void backward_kernel(const BackwardArgs& args); \
  }
MDPO_DECLARE_KERNELS(DEFAULT)
MDPO_DECLARE_KERNELS(AVX2)
MDPO_DECLARE_KERNELS(AVX512)
#undef MDPO_DECLARE_KERNELS

}  // namespace mdpo::cpu
