// The AVX-512 builds' tile and the generic search on it: search_avx512.cpp (fp32),
// search_avx512_i16.cpp (and its VNNI variant) and search_avx512bf16.cpp start with this, so that
// their fp32 search -- the one each hands its rows set aside to, and whose output theirs must equal
// bit for bit -- is the same code on the same tile.
//
// Tile: 3 x 16 rows against panels of 8 codes = 24 zmm accumulators; with the 3 row vectors that is
// 27 of the 32 zmm registers, the code broadcasts are folded into the FMAs ({1to16} memory operands),
// and each step of D does 24 FMAs for 3 vector loads and 8 broadcasts, well under the load ports'
// rate, so the two FMA pipes stay busy. Eight codes per panel also divide every power-of-two K.
#pragma once

#include "cpu_internal.h"

#include "simd_avx512.h"

namespace vqk {
namespace {

constexpr int MRV = 3;
constexpr int NR = 8;

}  // namespace
}  // namespace vqk

#include "search_impl.h"
