// AVX-512 build of logprobs_kernel.h (16 fp32 lanes), chosen at run time when torch's CPU
// capability is AVX512, which torch grants only with AVX-512 F, BW, VL and DQ. setup.py compiles
// this one file with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma (see logprobs_kernel_avx2.cpp).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX512
#define MDPO_ISA_ENABLED 1
#else
#define MDPO_ISA_ENABLED 0
#endif
#define CPU_CAPABILITY AVX512
#include "logprobs_kernel.h"
