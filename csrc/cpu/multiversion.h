// QGRAD_MULTIVERSION: compile a hot loop twice on x86-64 Linux with GCC or Clang, once for AVX2 and once for
// the build's baseline (SSE2), and let the dynamic loader pick one for the CPU it runs on (function
// multiversioning through an ifunc). The wheel stays portable while the int8 <-> float conversions and the
// 8-lane float arithmetic of the loops get 256-bit registers where the CPU has them: measured 1.8x on the
// l1 kernel with signs and 1.5x on add_scaled_sign for a 131k-element float32 tensor in cache. Only for
// flat loops: a function whose body calls a lambda or helper that GCC does not inline into the clone runs
// slower than the baseline (BatchNorm's per-segment loops measured 2x slower, so they have none). The
// vectorized loops keep the arithmetic order of the scalar ones (explicit lanes, no reassociation, no FMA
// contraction in ISO C++ mode), so both versions give the same results. Elsewhere (other compilers,
// platforms or architectures) it expands to nothing.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define QGRAD_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define QGRAD_MULTIVERSION
#endif
