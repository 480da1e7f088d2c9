// C++ CPU implementation of `sequence_logprobs`, registered as torch operators:
//
//   mdpo::logprobs_forward(Tensor logits, Tensor target, int ignore_index) -> (Tensor logps, Tensor lse)
//       logits (R, T, V) fp32/bf16/fp16, V contiguous, R and T any stride; target (R, T) int64, already
//       aligned (target[r, t] is scored by logits[r, t]). logps (R,) fp32 = Σ_t supervised logp; lse (R, T) fp32
//       (0 at ignored positions).
//   mdpo::logprobs_backward(Tensor grad_logps, Tensor logits, Tensor target, Tensor lse, int ignore_index) -> Tensor
//       grad (R, T, V) in logits.dtype, contiguous: g[r] · (onehot(target) − softmax) at supervised positions, 0 elsewhere.
//   mdpo::logprobs_backward_(Tensor grad_logps, Tensor(a!) logits, Tensor target, Tensor lse, int ignore_index) -> ()
//       The same gradient written over `logits` (in place; saves one (R, T, V) buffer).
//
// This file checks arguments, allocates, lists the supervised positions and sums per sequence; the
// maths runs in logprobs_kernel.h, built for DEFAULT / AVX2 / AVX512 and picked at run time from
// torch's own CPU capability (which honours ATEN_CPU_CAPABILITY). Work is split over supervised
// positions only (at::parallel_for on torch's intra-op pool), so ignored prompt tokens cost nothing
// and threads get equal work. Sums per sequence run in a fixed order, in double: deterministic for
// any thread count. The fake (meta) implementations are in mdpo_kernels/logprobs_native.py.
#include <Python.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "logprobs_cpu.h"

namespace mdpo::cpu {
namespace {

// ---------------------------------------------------------------- instruction-set choice

enum Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"default", "avx2", "avx512"};

// The best kernel set that both torch's CPU capability and this build allow.
int best_isa() {
  static const int best = [] {
    const std::string cap = at::get_cpu_capability();  // "AVX512", "AVX2", "DEFAULT", ...
    if (cap == "AVX512" && AVX512::isa_enabled()) return int{kAvx512};
    if ((cap == "AVX512" || cap == "AVX2") && AVX2::isa_enabled()) return int{kAvx2};
    return int{kDefault};
  }();
  return best;
}

std::atomic<int> g_isa_override{-1};  // set by _C._set_kernel_isa (tests); -1 = best_isa()

int current_isa() {
  const int forced = g_isa_override.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : best_isa();
}

void run_forward(const ForwardArgs& args) {
  switch (current_isa()) {
    case kAvx512: return AVX512::forward_kernel(args);
    case kAvx2: return AVX2::forward_kernel(args);
    default: return DEFAULT::forward_kernel(args);
  }
}

void run_backward(const BackwardArgs& args) {
  switch (current_isa()) {
    case kAvx512: return AVX512::backward_kernel(args);
    case kAvx2: return AVX2::backward_kernel(args);
    default: return DEFAULT::backward_kernel(args);
  }
}

// If this extension was linked against a different OpenMP runtime than torch's, keep its team
// size equal to torch's thread count (torch.set_num_threads). A no-op when they share one.
void sync_thread_count() {
#ifdef _OPENMP
  const int wanted = at::get_num_threads();
  if (omp_get_max_threads() != wanted) omp_set_num_threads(wanted);
#endif
}

// A fresh tensor that the caller is about to overwrite in full (the gradient). Linux maps fresh
// memory on first touch, 4 KiB per page fault: for a 500 MiB gradient that is 128K faults, which
// cost several times the kernel itself (measured: 285 ms to fault in 500 MiB, 80 ms with huge
// pages, 25 ms for the kernel's own writes). Advising transparent huge pages on the 2 MiB-aligned
// interior of the block cuts the faults 512-fold. The memory still comes from torch's allocator,
// so memory accounting sees it; where THP is off or the advice fails, nothing changes.
// MDPO_HUGEPAGES=0 turns the advice off (e.g. where THP compaction stalls are a concern).
bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* value = std::getenv("MDPO_HUGEPAGES");
    return value == nullptr || std::string(value) != "0";
  }();
  return wanted;
}

at::Tensor empty_for_overwrite(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + out.nbytes()) & ~(kHugePage - 1);
  if (out.nbytes() >= 8 * kHugePage && end > begin && huge_pages_wanted()) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only: failure is harmless
  }
#endif
  return out;
}

// ---------------------------------------------------------------- argument checks

Storage storage_of(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return Storage::kFloat;
    case at::kBFloat16: return Storage::kBFloat16;
    case at::kHalf: return Storage::kHalf;
    default: TORCH_CHECK(false, "mdpo: logits must be float32, bfloat16 or float16; got ", logits.scalar_type());
  }
  return Storage::kFloat;  // unreachable
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "mdpo: logits must be a CPU tensor for the native op; got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, "mdpo: logits must be 3-D (R, T, V); got shape ", logits.sizes());
  storage_of(logits);
}

// The kernels index the vocabulary with unit stride; rows and positions may have any stride.
at::Tensor vocab_contiguous(const at::Tensor& logits) {
  return logits.stride(2) == 1 || logits.size(2) <= 1 ? logits : logits.contiguous();
}

void check_rt(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mdpo: ", name, " must be a CPU tensor; got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), "mdpo: ", name,
              " must have shape (R, T) = (", logits.size(0), ", ", logits.size(1), "); got ", t.sizes());
}

void check_target(const at::Tensor& target, const at::Tensor& logits) {
  check_rt(target, logits, "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, "mdpo: target must be int64; got ", target.scalar_type());
}

void check_backward_args(const at::Tensor& grad_logps, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& lse) {
  check_logits(logits);
  check_target(target, logits);
  check_rt(lse, logits, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "mdpo: lse must be float32; got ", lse.scalar_type());
  TORCH_CHECK(grad_logps.device().is_cpu() && grad_logps.dim() == 1 && grad_logps.size(0) == logits.size(0),
              "mdpo: grad_logps must be a CPU tensor of shape (R,) = (", logits.size(0), ",); got ",
              grad_logps.sizes(), " on ", grad_logps.device());
  TORCH_CHECK(grad_logps.is_floating_point(), "mdpo: grad_logps must be floating point; got ", grad_logps.scalar_type());
}

// Flat indices p = r·T + t of the supervised positions (target ≠ ignore_index), checking their
// range, since an out-of-range target would read outside the row. `ignored` gets the others.
std::vector<int64_t> supervised_positions(const at::Tensor& target, int64_t vocab, int64_t ignore_index,
                                          std::vector<int64_t>* ignored = nullptr) {
  const int64_t positions = target.size(1), n = target.numel();
  const int64_t* y = target.const_data_ptr<int64_t>();
  std::vector<int64_t> supervised;
  supervised.reserve(n);
  for (int64_t p = 0; p < n; ++p) {
    if (y[p] == ignore_index) {
      if (ignored) ignored->push_back(p);
      continue;
    }
    TORCH_CHECK(y[p] >= 0 && y[p] < vocab, "mdpo: target[", p / positions, ", ", p % positions, "] = ", y[p],
                " is outside the vocabulary [0, ", vocab, ") and is not ignore_index=", ignore_index);
    supervised.push_back(p);
  }
  return supervised;
}

// ---------------------------------------------------------------- operators

std::tuple<at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                    int64_t ignore_index) {
  check_logits(logits_in);
  check_target(target_in, logits_in);
  const at::Tensor logits = vocab_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const int64_t rows = logits.size(0), positions = logits.size(1), vocab = logits.size(2);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::zeros({rows, positions}, f32);
  std::vector<float> token_logp(rows * positions, 0.f);  // R·T floats, never R·T·V

  const std::vector<int64_t> supervised = supervised_positions(target, vocab, ignore_index);
  if (!supervised.empty()) {
    sync_thread_count();
    run_forward(ForwardArgs{logits.const_data_ptr(), storage_of(logits), positions, vocab, logits.stride(0),
                            logits.stride(1), supervised.data(), static_cast<int64_t>(supervised.size()),
                            target.const_data_ptr<int64_t>(), lse.mutable_data_ptr<float>(), token_logp.data()});
  }
  // Per-sequence sums in position order, in double: the same bits for any thread count.
  at::Tensor logps = at::empty({rows}, f32);
  float* out = logps.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    double total = 0.0;
    for (int64_t t = 0; t < positions; ++t) total += token_logp[r * positions + t];
    out[r] = static_cast<float>(total);
  }
  return {logps, lse};
}

// Writes the gradient into `grad` (a fresh tensor or `logits` itself).
void backward_into(const at::Tensor& grad_logps_in, const at::Tensor& logits, const at::Tensor& target_in,
                   const at::Tensor& lse_in, int64_t ignore_index, const at::Tensor& grad) {
  const at::Tensor target = target_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor grad_logps = grad_logps_in.to(at::kFloat).contiguous();
  const int64_t positions = logits.size(1), vocab = logits.size(2);
  std::vector<int64_t> ignored;
  const std::vector<int64_t> supervised = supervised_positions(target, vocab, ignore_index, &ignored);
  sync_thread_count();
  if (!supervised.empty()) {
    run_backward(BackwardArgs{logits.const_data_ptr(), grad.mutable_data_ptr(), storage_of(logits), positions, vocab,
                              logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1), supervised.data(),
                              static_cast<int64_t>(supervised.size()), target.const_data_ptr<int64_t>(),
                              lse.const_data_ptr<float>(), grad_logps.const_data_ptr<float>()});
  }
  // Ignored positions get a zero gradient (all-zero bits in fp32, bf16 and fp16 alike).
  const int64_t row_bytes = vocab * static_cast<int64_t>(grad.element_size());
  char* base = static_cast<char*>(grad.mutable_data_ptr());
  const int64_t elem = grad.element_size(), sr = grad.stride(0), st = grad.stride(1);
  at::parallel_for(0, static_cast<int64_t>(ignored.size()), std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, row_bytes)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t k = begin; k < end; ++k) {
                       const int64_t r = ignored[k] / positions, t = ignored[k] % positions;
                       std::memset(base + (r * sr + t * st) * elem, 0, row_bytes);
                     }
                   });
}

at::Tensor logprobs_backward(const at::Tensor& grad_logps, const at::Tensor& logits_in, const at::Tensor& target,
                             const at::Tensor& lse, int64_t ignore_index) {
  check_backward_args(grad_logps, logits_in, target, lse);
  const at::Tensor logits = vocab_contiguous(logits_in);
  at::Tensor grad = empty_for_overwrite(logits.sizes(), logits.options());  // contiguous, logits.dtype
  backward_into(grad_logps, logits, target, lse, ignore_index, grad);
  return grad;
}

void logprobs_backward_(const at::Tensor& grad_logps, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& lse, int64_t ignore_index) {
  check_backward_args(grad_logps, logits, target, lse);
  TORCH_CHECK(logits.stride(2) == 1 || logits.size(2) <= 1, "mdpo: in-place backward needs logits with a contiguous last dimension; got strides ",
              logits.strides());
  TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "mdpo: in-place backward needs logits whose elements do not overlap (e.g. not an expand())");
  backward_into(grad_logps, logits, target, lse, ignore_index, logits);
}

}  // namespace
}  // namespace mdpo::cpu

TORCH_LIBRARY(mdpo, m) {
  m.def("logprobs_forward(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor)");
  m.def("logprobs_backward(Tensor grad_logps, Tensor logits, Tensor target, Tensor lse, int ignore_index) -> Tensor");
  m.def("logprobs_backward_(Tensor grad_logps, Tensor(a!) logits, Tensor target, Tensor lse, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(mdpo, CPU, m) {
  m.impl("logprobs_forward", &mdpo::cpu::logprobs_forward);
  m.impl("logprobs_backward", &mdpo::cpu::logprobs_backward);
  m.impl("logprobs_backward_", &mdpo::cpu::logprobs_backward_);
}

// ---------------------------------------------------------------- Python module mdpo_kernels._C
// Importing the module loads this library, whose static initialisers register the operators above.
// No pybind11: two plain functions to inspect (and, for tests, force) the kernel instruction set.

namespace {

PyObject* py_kernel_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(mdpo::cpu::kIsaNames[mdpo::cpu::current_isa()]);
}

PyObject* py_set_kernel_isa(PyObject*, PyObject* arg) {
  if (arg == Py_None) {
    mdpo::cpu::g_isa_override.store(-1);
    Py_RETURN_NONE;
  }
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  for (int isa = 0; name != nullptr && isa <= mdpo::cpu::best_isa(); ++isa) {
    if (std::strcmp(name, mdpo::cpu::kIsaNames[isa]) == 0) {
      mdpo::cpu::g_isa_override.store(isa);
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "kernel isa must be None, 'default', 'avx2' or 'avx512', and no better than "
               "'%s' (the best this CPU and build allow)", mdpo::cpu::kIsaNames[mdpo::cpu::best_isa()]);
  return nullptr;
}

PyMethodDef kMethods[] = {
    {"kernel_isa", py_kernel_isa, METH_NOARGS, "Instruction set the kernels run with: 'avx512', 'avx2' or 'default'."},
    {"_set_kernel_isa", py_set_kernel_isa, METH_O,
     "Force a kernel instruction set no better than the best one (None restores it). For tests."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "C++ CPU kernels of mdpo_kernels (torch.ops.mdpo.*)", -1, kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
