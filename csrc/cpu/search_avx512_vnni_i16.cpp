// AVX-512 int16 first pass with AVX512_VNNI's vpdpwssd (VQK_CPU_ISA=avx512_vnni_i16): the
// avx512_i16 build (search_avx512_i16.cpp, where everything is explained) with each vpmaddwd +
// vpaddd pair fused into one _mm512_dpwssd_epi32, the same int32 sums (no partial sum overflows).
// Built with the avx512 flags plus -mavx512vnni; run only where the CPU reports AVX512_VNNI
// (Cascade Lake, Ice Lake, Zen 4, ...). Timed on a Zen 4 EPYC (benchmarks/results/
// cpu-zen4-2026-12-02.md) and an Ice Lake Xeon (cpu-icelake-2026-12-02.md): the fastest path on
// both, so auto takes it for K >= 32, D >= 8 on AMD family 25 with AVX-512 VNNI and on CPUs with
// AVX-512 VNNI but not AVX-512 BF16 (vq_cpu.cpp).
#define VQK_I16_VNNI 1
#include "search_avx512_i16.cpp"
