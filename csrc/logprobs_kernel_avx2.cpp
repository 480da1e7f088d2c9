// AVX2 + FMA build of logprobs_kernel.h (8 fp32 lanes), chosen at run time when torch's CPU
// capability is AVX2 or better. setup.py compiles this one file with -mavx2 -mfma -mf16c (x86-64,
// GCC or clang); the rest of the extension stays baseline x86-64, so it still loads on CPUs
// without AVX2. Built without those flags, this file holds the portable code and is marked disabled.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#define MDPO_ISA_ENABLED 1
#else
#define MDPO_ISA_ENABLED 0
#endif
#define CPU_CAPABILITY AVX2
#include "logprobs_kernel.h"
