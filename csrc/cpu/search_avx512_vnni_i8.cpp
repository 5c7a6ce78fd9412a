// AVX-512 VNNI int8 tier in front of the avx512_vnni_i16 pass (VQK_CPU_ISA=avx512_vnni_i8).
// PLACEHOLDER while the build plumbing lands: the avx512_vnni_i16 search under the new name.
#define VQK_I16_VNNI 1
#define VQK_I16_AS_PART 1
#include "search_avx512_i16.cpp"
#undef VQK_I16_AS_PART

namespace vqk {
namespace cpu {
const SearchKernels& kernels_avx512_vnni_i8() {
  static const SearchKernels k{"avx512_vnni_i8", MR, NR, pack_any_i16, search_any_i16,
                               flush_set_aside, i16_scratch_floats, false, true, nullptr, nullptr,
                               false};
  return k;
}
}  // namespace cpu
}  // namespace vqk
