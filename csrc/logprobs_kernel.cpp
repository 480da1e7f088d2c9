// Portable build of logprobs_kernel.h: no ISA flags, so at::vec uses its generic 8-lane code (plain
// loops the compiler may auto-vectorise for the baseline: SSE2 on x86-64, NEON on arm64). Chosen
// when torch reports neither AVX2 nor AVX512 (or ATEN_CPU_CAPABILITY=default).
//
// Link order matters: this object must come before logprobs_kernel_avx*.o, so that for an inline
// function emitted by several of them (say a c10::Half conversion) the linker keeps this baseline
// copy, never an AVX one that a CPU without AVX would then run. setuptools links the objects in
// sorted source order, and "logprobs_kernel.cpp" sorts before "logprobs_kernel_avx2.cpp".
#define CPU_CAPABILITY DEFAULT
#define MDPO_ISA_ENABLED 1
#include "logprobs_kernel.h"
