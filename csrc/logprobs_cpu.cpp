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
#include <cctype>
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
// memory on first touch, 4 KiB per page fault: for a 500 MiB gradient that is 128K faults, which can
// cost several times the kernel itself. Advising transparent huge pages (MADV_HUGEPAGE) on the 2 MiB-
// aligned interior of the block cuts the faults 512-fold, and in a tight loop that reuses just-freed
// memory it is the fastest. But the default must be what a user gets over many fresh gradients, and
// there the advice is a gamble on the state of the machine. Where THP `defrag` is `always` or
// `madvise` (the usual default) an advised fault waits for a whole 2 MiB block (reclaim / compaction
// if it must); in a VM whose free 2 MiB blocks go back to the host (virtio-balloon free page
// reporting) each huge page is also a fresh host allocation. Measured on the 2-core dev VM (THP
// enabled=madvise, defrag=madvise, page_reporting_order=9), 2026-12-01, 1 torch thread, one process,
// advice off / on interleaved, a fresh gradient per call; sequence_logprobs fwd+bwd fp32
// (8 x 513 x 32000 = 501 MiB unless said), median (min-max) ms. Machine under load (load avg 3-5):
//   back to back, n=15:                 off  495 (360-648)    on  248 (155-1885)
//   0.5 s pause before each call, n=15: off  706 (591-1102)   on 1222 (187-2285)
//   1 s pause, n=10:                    off  545 (419-651)    on  822 (215-2457)
//   2 s pause, n=10:                    off  662 (316-787)    on 1575 (910-2642)
//   2 s pause, n=15:                    off  481 (340-677)    on  874 (485-2426)
//   3 s pause, n=15:                    off  562 (315-664)    on  805 (197-2395)
//   2 s pause, 1002 MiB, n=8:           off 1107 (955-1752)   on 3035 (1865-5488)
//   2 s pause, 125 MiB, n=15:           off  229 (198-286)    on  109 (69-718)
// Machine quiet (load avg ~1; benchmarks/results/logprobs-cpu*.md, 4096 x 32000):
//   back to back, n=15:                 off  325 (306-393)    on  153 (123-733)
//   2 s pause, n=15:                    off  332 (321-550)    on  154 (124-285)
//   2 s pause, n=15, 20 min earlier:    off  348 (329-641)    on  722 (189-1464)
// The idle run (2 threads, n=15): off 140-180, on 100-690 (median ~300). The guest never
// compacted (compact_stall and thp_fault_fallback stayed 0) while free page reporting handed GBs back
// to the host: the cost is in getting that memory back, and it swings with the host. So the advice
// wins ~2x when the machine is quiet and loses 1.4-2.7x by median, with stalls of seconds, when it is
// busy; off never stalls (it costs ~2.5 us per 4 KiB fault, steadily). The default is the predictable
// one: no advice. MDPO_HUGEPAGES=1 (or on/true/yes) opts in where huge pages are cheap (a quiet or
// bare-metal machine with free memory), =0 (off/false/no) keeps it off; any other value is an error
// naming the variable. _C._set_huge_pages overrides it in process (the benchmark's `ours-hugepages`;
// `python -m benchmarks.logprobs --pause-s 2` re-measures the trade-off). The memory comes from
// torch's allocator either way, so memory accounting sees it; where THP is off or the advice fails,
// nothing changes.
int huge_pages_from_env() {
  const char* value = std::getenv("MDPO_HUGEPAGES");
  if (value == nullptr || *value == '\0') return 0;
  std::string text(value);
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (text == "1" || text == "on" || text == "true" || text == "yes") return 1;
  if (text == "0" || text == "off" || text == "false" || text == "no") return 0;
  TORCH_CHECK(false, "mdpo: MDPO_HUGEPAGES must be 1 (advise transparent huge pages for fresh gradients) or 0 "
              "(do not; the default); got '", value, "'");
  return 0;  // unreachable
}

std::atomic<int> g_huge_pages_override{-1};  // set by _C._set_huge_pages; -1 = MDPO_HUGEPAGES (default off)

bool huge_pages_wanted() {
  const int forced = g_huge_pages_override.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  static const bool from_env = huge_pages_from_env() == 1;  // read once; a bad value throws on every call
  return from_env;
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

PyObject* py_huge_pages(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(mdpo::cpu::huge_pages_wanted());
  } catch (const c10::Error& err) {
    PyErr_SetString(PyExc_ValueError, err.what_without_backtrace());
    return nullptr;
  }
}

PyObject* py_set_huge_pages(PyObject*, PyObject* arg) {
  if (arg != Py_None && !PyBool_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "_set_huge_pages takes True, False or None (None: back to MDPO_HUGEPAGES)");
    return nullptr;
  }
  mdpo::cpu::g_huge_pages_override.store(arg == Py_None ? -1 : (arg == Py_True ? 1 : 0));
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"kernel_isa", py_kernel_isa, METH_NOARGS, "Instruction set the kernels run with: 'avx512', 'avx2' or 'default'."},
    {"_set_kernel_isa", py_set_kernel_isa, METH_O,
     "Force a kernel instruction set no better than the best one (None restores it). For tests."},
    {"huge_pages", py_huge_pages, METH_NOARGS,
     "Whether fresh gradients are advised onto transparent huge pages (MDPO_HUGEPAGES, default False)."},
    {"_set_huge_pages", py_set_huge_pages, METH_O,
     "Force the huge-page advice on (True) or off (False); None goes back to MDPO_HUGEPAGES. For benchmarks."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "C++ CPU kernels of mdpo_kernels (torch.ops.mdpo.*)", -1, kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
