// The x86-emulated target's check of its own shims (csrc/cpu/simde_avx512.h: the intrinsics SIMDe
// 0.7.4 lacks, and the ones it gets wrong for our purposes), built with the emulated kernels' flags
// and run before the kernel driver. Each is held to Intel's documented semantics on the cases where
// a plausible mistake shows: rounding ties, NaN, infinities and denormals in the conversions; the
// vdpbf16ps order (odd pair first) and its flushing of denormals; single rounding in fmadd; signed
// and unsigned widening; GCC's summation order in _mm512_reduce_add_ps; and masked loads and
// stores that end at a page followed by an inaccessible one (a read or write of a masked-off lane
// there is a crash, as it is not on the hardware). The references are the project's scalar
// conversions (csrc/include/vqk/common.h) and arithmetic written out here.
// Exit status: 0 when every check passed, 1 otherwise.
#include <sys/mman.h>
#include <unistd.h>

#include <cinttypes>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "simde_avx512.h"
#include "vqk/common.h"

namespace {

int g_failures = 0, g_checks = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    ++g_checks;                                                   \
    if (!(cond) && ++g_failures <= 30) {                          \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
      std::fprintf(stderr, __VA_ARGS__);                          \
      std::fputc('\n', stderr);                                   \
    }                                                             \
  } while (0)

uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// 16 floats in and out of a vector.
__m512 vec(const float* v) { __m512 r; std::memcpy(&r, v, 64); return r; }
void lanes(__m512 a, float* out) { std::memcpy(out, &a, 64); }

// bf16 conversion: the SDM's convert_fp32_to_bfloat16 is vqk::float_to_bf16 (round to nearest
// even, NaN made quiet) except that denormals become a zero of their sign.
void check_bf16(std::mt19937& rng) {
  std::vector<uint32_t> pats = {0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu, 0x7f800000u,
                                0xff800000u, 0x7f800001u, 0xffa00001u, 0x00000001u, 0x807fffffu,
                                0x00800000u, 0x80000000u, 0x00000000u, 0x3f7fffffu, 0xc0c08000u,
                                0x00ffffffu};
  for (int i = 0; i < 20000; ++i) pats.push_back(rng());
  for (size_t i = 0; i + 16 <= pats.size(); i += 16) {
    float in[16];
    for (int j = 0; j < 16; ++j) in[j] = from_bits(pats[i + j]);
    const __m256bh r = _mm512_cvtneps_pbh(vec(in));
    uint16_t out[16];
    std::memcpy(out, &r, 32);
    __m256 lo;
    std::memcpy(&lo, in, 32);
    const __m128bh r8 = _mm256_cvtneps_pbh(lo);
    uint16_t out8[8];
    std::memcpy(out8, &r8, 16);
    for (int j = 0; j < 16; ++j) {
      const uint32_t u = pats[i + j];
      const bool denormal = (u & 0x7f800000u) == 0 && (u & 0x7fffffu) != 0;
      const uint16_t want = denormal ? (uint16_t)((u >> 16) & 0x8000u) : vqk::float_to_bf16(in[j]);
      CHECK(out[j] == want, "_mm512_cvtneps_pbh(%08" PRIx32 ") = %04x, want %04x", u, out[j], want);
      if (j < 8) CHECK(out8[j] == want, "_mm256_cvtneps_pbh(%08" PRIx32 ") = %04x, want %04x", u, out8[j], want);
    }
  }
}

// f16: every half to float exactly; floats to half with round to nearest even (NaN stays NaN).
void check_f16(std::mt19937& rng) {
  for (uint32_t h0 = 0; h0 < 65536; h0 += 16) {
    uint16_t in[16];
    for (int j = 0; j < 16; ++j) in[j] = (uint16_t)(h0 + j);
    __m256i v;
    std::memcpy(&v, in, 32);
    float out[16];
    lanes(_mm512_cvtph_ps(v), out);
    for (int j = 0; j < 16; ++j) {
      const float want = vqk::half_to_float(in[j]);
      CHECK(std::isnan(want) ? std::isnan(out[j]) : bits(out[j]) == bits(want),
            "_mm512_cvtph_ps(%04x) = %08" PRIx32 ", want %08" PRIx32, in[j], bits(out[j]), bits(want));
    }
  }
  for (int i = 0; i < 2000; ++i) {
    float in[16];
    for (int j = 0; j < 16; ++j) {
      // Mostly within half's range (and its rounding ties), some anywhere.
      const uint32_t u = (j % 4 == 0) ? rng() : (rng() & 0x80001fffu) | ((0x30u + rng() % 0x18u) << 23);
      in[j] = from_bits(j == 5 ? (rng() & 0x80000000u) | 0x3f801000u : u);  // a tie at 1 + 2^-11
    }
    uint16_t out[16];
    const __m256i r = _mm512_cvtps_ph(vec(in), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(out, &r, 32);
    for (int j = 0; j < 16; ++j) {
      const uint16_t want = vqk::float_to_half(in[j]);
      const bool nan = std::isnan(in[j]);
      CHECK(nan ? (out[j] & 0x7c00u) == 0x7c00u && (out[j] & 0x3ffu) != 0 : out[j] == want,
            "_mm512_cvtps_ph(%08" PRIx32 ") = %04x, want %04x", bits(in[j]), out[j], want);
    }
  }
}

// vdpbf16ps per lane: acc = ftz(fma(a_odd, b_odd, daz(acc))), then the same with the even pair.
void check_dpbf16() {
  struct Case { float src, a_hi, b_hi, a_lo, b_lo, want; const char* what; };
  const float t24 = std::ldexp(1.0f, -24), t70 = std::ldexp(1.0f, -70);
  const Case cases[] = {
      // Each add rounded: 1 + 2^-24 is a tie (to even: 1), twice; the two products summed first
      // (SIMDe's vector form) would give 1 + 2^-23.
      {1.0f, 1.0f, t24, 1.0f, t24, 1.0f, "each add rounded"},
      // The odd (high) pair first: 1 + 2^-24 -> 1, then - 1 -> 0; the even pair first gives 2^-24.
      {1.0f, t24, 1.0f, -1.0f, 1.0f, 0.0f, "odd pair first"},
      // A product below float's normal range is flushed to zero (not kept as a denormal).
      {0.0f, t70, t70, 0.0f, 0.0f, 0.0f, "denormal result flushed"},
      // A denormal accumulator is read as zero.
      {std::ldexp(1.0f, -140), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, "denormal accumulator read as zero"},
      {2.0f, 3.0f, 0.5f, -1.0f, 4.0f, -0.5f, "plain sum"},
  };
  for (const Case& c : cases) {
    float src[16];
    uint16_t a[32], b[32];
    for (int j = 0; j < 16; ++j) {
      src[j] = c.src;
      a[2 * j + 1] = vqk::float_to_bf16(c.a_hi), b[2 * j + 1] = vqk::float_to_bf16(c.b_hi);
      a[2 * j] = vqk::float_to_bf16(c.a_lo), b[2 * j] = vqk::float_to_bf16(c.b_lo);
    }
    __m512bh av, bv;
    std::memcpy(&av, a, 64);
    std::memcpy(&bv, b, 64);
    float out[16];
    lanes(_mm512_dpbf16_ps(vec(src), av, bv), out);
    for (int j = 0; j < 16; ++j)
      CHECK(bits(out[j]) == bits(c.want), "_mm512_dpbf16_ps, %s: lane %d = %a, want %a", c.what, j, out[j], c.want);
  }
}

void check_arith() {
  // fmadd rounds once: (1 + 2^-11)^2 - (1 + 2^-10) = 2^-22 exactly, 0 when the product is rounded
  // to float first (1 + 2^-10 + 2^-22 is a tie, rounded to even).
  const float a = 1.0f + std::ldexp(1.0f, -11), c = -(1.0f + std::ldexp(1.0f, -10));
  float out[16];
  lanes(_mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_set1_ps(a), _mm512_set1_ps(c)), out);
  for (int j = 0; j < 16; ++j) CHECK(out[j] == std::ldexp(1.0f, -22), "_mm512_fmadd_ps rounds twice: %a", out[j]);
  lanes(_mm512_fnmadd_ps(_mm512_set1_ps(a), _mm512_set1_ps(a), _mm512_set1_ps(-c)), out);
  for (int j = 0; j < 16; ++j) CHECK(out[j] == -std::ldexp(1.0f, -22), "_mm512_fnmadd_ps rounds twice: %a", out[j]);

  // GCC's reduction order: lanes i and 8 + i, then 4 apart, then 2, then 1. Here it cancels the
  // 2^30s exactly where a left-to-right sum would lose the small terms.
  float v[16];
  for (int j = 0; j < 16; ++j) v[j] = (float)(j + 1);
  v[0] = std::ldexp(1.0f, 30), v[8] = -std::ldexp(1.0f, 30);
  const float tree = _mm512_reduce_add_ps(vec(v));
  float want = 0;
  {
    float t8[8], t4[4];
    for (int i = 0; i < 8; ++i) t8[i] = v[8 + i] + v[i];
    for (int i = 0; i < 4; ++i) t4[i] = t8[4 + i] + t8[i];
    want = (t4[0] + t4[2]) + (t4[1] + t4[3]);
  }
  CHECK(tree == want && tree == 136.0f - 1.0f - 9.0f, "_mm512_reduce_add_ps = %g, want %g", tree, want);

  // Widening and narrowing of 16-bit lanes: unsigned in, truncating out; signed compares.
  uint16_t h[16];
  int32_t w[16], x[16], y[16];
  for (int j = 0; j < 16; ++j) {
    h[j] = (uint16_t)(0xfff0u + j * 7);
    w[j] = (int32_t)(0x12340000u + (uint32_t)j * 0x10001u) * (j % 2 ? -1 : 1);
    x[j] = j - 8, y[j] = 8 - j;
  }
  __m256i hv;
  std::memcpy(&hv, h, 32);
  __m512i wv, xv, yv;
  std::memcpy(&wv, w, 64);
  std::memcpy(&xv, x, 64);
  std::memcpy(&yv, y, 64);
  int32_t r32[16];
  const __m512i widened = _mm512_cvtepu16_epi32(hv);
  std::memcpy(r32, &widened, 64);
  uint16_t r16[16];
  const __m256i narrowed = _mm512_cvtepi32_epi16(wv);
  std::memcpy(r16, &narrowed, 32);
  const unsigned lt = _mm512_cmplt_epi32_mask(xv, yv);
  for (int j = 0; j < 16; ++j) {
    CHECK(r32[j] == (int32_t)h[j], "_mm512_cvtepu16_epi32 lane %d: %d", j, r32[j]);
    CHECK(r16[j] == (uint16_t)((uint32_t)w[j] & 0xffffu), "_mm512_cvtepi32_epi16 lane %d: %04x", j, r16[j]);
    CHECK(((lt >> j) & 1) == (unsigned)(x[j] < y[j]), "_mm512_cmplt_epi32_mask lane %d", j);
  }

  // vpmaddwd: signed 16-bit pairs multiplied and summed into 32 bits.
  int16_t p[32], q[32];
  for (int j = 0; j < 32; ++j) p[j] = (int16_t)(j % 3 ? -32768 + j : 32767 - j), q[j] = (int16_t)(j * 1000 - 15000);
  __m512i pv, qv;
  std::memcpy(&pv, p, 64);
  std::memcpy(&qv, q, 64);
  const __m512i md = _mm512_madd_epi16(pv, qv);
  std::memcpy(r32, &md, 64);
  for (int j = 0; j < 16; ++j)
    CHECK(r32[j] == (int32_t)((uint32_t)(p[2 * j] * q[2 * j]) + (uint32_t)(p[2 * j + 1] * q[2 * j + 1])),
          "_mm512_madd_epi16 lane %d: %d", j, r32[j]);

  // shuffle_f32x4: 128-bit blocks imm[1:0], imm[3:2] of a, then imm[5:4], imm[7:6] of b.
  float aa[16], bb[16];
  for (int j = 0; j < 16; ++j) aa[j] = (float)j, bb[j] = (float)(100 + j);
  lanes(_mm512_shuffle_f32x4(vec(aa), vec(bb), 0x9c), out);  // blocks a0, a3, b1, b2... imm 10 01 11 00
  const int blk[4] = {0, 3, 1, 2};
  for (int j = 0; j < 16; ++j) {
    const float want_j = (j < 8 ? aa : bb)[blk[j / 4] * 4 + j % 4];
    CHECK(out[j] == want_j, "_mm512_shuffle_f32x4 lane %d: %g, want %g", j, out[j], want_j);
  }

  // Gather: base + index * scale, negative indices included.
  float table[64];
  for (int j = 0; j < 64; ++j) table[j] = (float)(j * j);
  int32_t ix[16];
  for (int j = 0; j < 16; ++j) ix[j] = (j * 11) % 32 - 16;
  __m512i iv;
  std::memcpy(&iv, ix, 64);
  lanes(_mm512_i32gather_ps(iv, table + 32, 4), out);
  for (int j = 0; j < 16; ++j) CHECK(out[j] == table[32 + ix[j]], "_mm512_i32gather_ps lane %d", j);
}

// The integer conversions and reductions shimmed for builds to come.
void check_int() {
  int32_t w[16];
  float f[16];
  const float specials[16] = {0.5f, -0.5f, 1.5f, -1.5f, 2147483520.0f, -2147483648.0f, 2147483648.0f,
                              -2147483904.0f, NAN, INFINITY, -INFINITY, 16777217.0f, -7.99f, 7.99f,
                              1e-40f, -0.0f};
  for (int j = 0; j < 16; ++j) w[j] = (int32_t)(0x01000001u * (uint32_t)(j * 37 + 1)) ^ (j % 2 ? INT32_MIN : 0);
  __m512i wv;
  std::memcpy(&wv, w, 64);
  float out[16];
  lanes(_mm512_cvtepi32_ps(wv), out);
  for (int j = 0; j < 16; ++j)
    CHECK(out[j] == (float)(double)w[j], "_mm512_cvtepi32_ps(%d) = %a", w[j], out[j]);  // exact in double, then one rounding
  std::memcpy(f, specials, 64);
  const __m512i tv = _mm512_cvttps_epi32(vec(f));
  int32_t t[16];
  std::memcpy(t, &tv, 64);
  const int32_t want_t[16] = {0, 0, 1, -1, 2147483520, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN,
                              INT32_MIN, INT32_MIN, 16777216, -7, 7, 0, 0};
  for (int j = 0; j < 16; ++j) CHECK(t[j] == want_t[j], "_mm512_cvttps_epi32(%a) = %d, want %d", f[j], t[j], want_t[j]);
  int32_t r[16];
  for (unsigned sh : {0u, 5u, 31u, 32u, 200u}) {
    const __m512i sv = _mm512_srai_epi32(wv, sh);
    std::memcpy(r, &sv, 64);
    for (int j = 0; j < 16; ++j) {
      const int64_t want = sh > 31 ? (w[j] < 0 ? -1 : 0) : (int64_t)std::floor((double)w[j] / std::ldexp(1.0, (int)sh));
      CHECK(r[j] == want, "_mm512_srai_epi32(%d, %u) = %d", w[j], sh, r[j]);
    }
  }
  int16_t h16[16];
  int8_t b8[32];
  for (int j = 0; j < 16; ++j) h16[j] = (int16_t)(j % 2 ? -32768 + j * 999 : 32767 - j * 999);
  for (int j = 0; j < 32; ++j) b8[j] = (int8_t)(j * 17 - 128);
  __m256i hv, bv;
  __m128i qv;
  std::memcpy(&hv, h16, 32);
  std::memcpy(&bv, b8, 32);
  std::memcpy(&qv, b8, 16);
  __m512i rv = _mm512_cvtepi16_epi32(hv);
  std::memcpy(r, &rv, 64);
  for (int j = 0; j < 16; ++j) CHECK(r[j] == h16[j], "_mm512_cvtepi16_epi32 lane %d: %d", j, r[j]);
  rv = _mm512_cvtepi8_epi32(qv);
  std::memcpy(r, &rv, 64);
  for (int j = 0; j < 16; ++j) CHECK(r[j] == b8[j], "_mm512_cvtepi8_epi32 lane %d: %d", j, r[j]);
  rv = _mm512_cvtepu8_epi16(bv);
  int16_t r16[32];
  std::memcpy(r16, &rv, 64);
  for (int j = 0; j < 32; ++j) CHECK(r16[j] == (uint8_t)b8[j], "_mm512_cvtepu8_epi16 lane %d: %d", j, r16[j]);
  uint32_t sum = 0;
  for (int j = 0; j < 16; ++j) sum += (uint32_t)w[j];
  CHECK(_mm512_reduce_add_epi32(wv) == (int32_t)sum, "_mm512_reduce_add_epi32 does not wrap as the hardware");
  int32_t x[16], y[16];
  for (int j = 0; j < 16; ++j) x[j] = j % 3 - 1 + (j == 4 ? INT32_MIN : 0), y[j] = (j / 3) % 3 - 1;
  __m512i xv, yv;
  std::memcpy(&xv, x, 64);
  std::memcpy(&yv, y, 64);
  const unsigned m[8] = {_mm512_cmp_epi32_mask(xv, yv, 0), _mm512_cmp_epi32_mask(xv, yv, 1),
                         _mm512_cmp_epi32_mask(xv, yv, 2), _mm512_cmp_epi32_mask(xv, yv, 3),
                         _mm512_cmp_epi32_mask(xv, yv, 4), _mm512_cmp_epi32_mask(xv, yv, 5),
                         _mm512_cmp_epi32_mask(xv, yv, 6), _mm512_cmp_epi32_mask(xv, yv, 7)};
  for (int j = 0; j < 16; ++j) {
    const bool want[8] = {x[j] == y[j], x[j] < y[j], x[j] <= y[j], false,
                          x[j] != y[j], x[j] >= y[j], x[j] > y[j], true};
    for (int k = 0; k < 8; ++k) CHECK(((m[k] >> j) & 1) == (unsigned)want[k], "_mm512_cmp_epi32_mask imm %d lane %d", k, j);
  }
}

// The int16 builds' conversions (search_avx512_i16.cpp): int32 -> fp32 rounds to nearest even
// (ties at 2^24 + 1 and 2^25 + 2, the extremes), truncation to int32 from fp32 and fp64 (toward
// zero; NaN, infinities and values outside int32 give 0x80000000), and fp32 -> fp64 exactly.
void check_int16_conversions() {
  const int32_t iv[16] = {0, 1, -1, 16777217, 16777219, -16777217, 33554434, 33554438,
                          2147483647, -2147483647 - 1, 2147483583, 2147483584, 123456789, -98765432,
                          16777216, 7};
  const float iw[16] = {0.0f, 1.0f, -1.0f, 16777216.0f, 16777220.0f, -16777216.0f, 33554432.0f,
                        33554440.0f, 2147483648.0f, -2147483648.0f, 2147483520.0f, 2147483648.0f,
                        123456792.0f, -98765432.0f, 16777216.0f, 7.0f};
  __m512i a;
  std::memcpy(&a, iv, 64);
  float out[16];
  lanes(_mm512_cvtepi32_ps(a), out);
  for (int j = 0; j < 16; ++j)
    CHECK(bits(out[j]) == bits(iw[j]), "_mm512_cvtepi32_ps(%d) = %.1f, want %.1f", iv[j], out[j], iw[j]);
  const float fv[16] = {0.0f, -0.0f, 1.99f, -1.99f, 2147483520.0f, -2147483648.0f, 2147483648.0f,
                        -2147483904.0f, std::nanf(""), INFINITY, -INFINITY, 0.5f, -0.5f, 1e-40f,
                        32767.0f, -32768.0f};
  const int32_t fw[16] = {0, 0, 1, -1, 2147483520, -2147483647 - 1, -2147483647 - 1, -2147483647 - 1,
                          -2147483647 - 1, -2147483647 - 1, -2147483647 - 1, 0, 0, 0, 32767, -32768};
  int32_t r32[16];
  const __m512i t = _mm512_cvttps_epi32(vec(fv));
  std::memcpy(r32, &t, 64);
  for (int j = 0; j < 16; ++j)
    CHECK(r32[j] == fw[j], "_mm512_cvttps_epi32(%a) = %d, want %d", fv[j], r32[j], fw[j]);
  const double dv[8] = {2147483647.9, -2147483648.9, 2147483648.0, -2147483649.0, std::nan(""),
                        -7.75, 65535.5, 1e300};
  const int32_t dw[8] = {2147483647, -2147483647 - 1, -2147483647 - 1, -2147483647 - 1,
                         -2147483647 - 1, -7, 65535, -2147483647 - 1};
  __m512d d;
  std::memcpy(&d, dv, 64);
  const __m256i td = _mm512_cvttpd_epi32(d);
  std::memcpy(r32, &td, 32);
  for (int j = 0; j < 8; ++j)
    CHECK(r32[j] == dw[j], "_mm512_cvttpd_epi32(%a) = %d, want %d", dv[j], r32[j], dw[j]);
  __m256 h;
  std::memcpy(&h, fv + 8, 32);
  const __m512d w = _mm512_cvtps_pd(h);
  double wd[8];
  std::memcpy(wd, &w, 64);
  for (int j = 0; j < 8; ++j) {
    const double want = (double)fv[8 + j];
    CHECK(std::isnan(want) ? std::isnan(wd[j]) : std::memcmp(&wd[j], &want, 8) == 0,
          "_mm512_cvtps_pd(%a) = %a", fv[8 + j], wd[j]);
  }
}

// Masked loads and stores of n < 16 elements that end where an inaccessible page begins.
void check_masked() {
  const long page = sysconf(_SC_PAGESIZE);
  char* mem = static_cast<char*>(mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  CHECK(mem != MAP_FAILED, "mmap failed");
  if (mem == MAP_FAILED) return;
  CHECK(mprotect(mem + page, page, PROT_NONE) == 0, "mprotect failed");
  char* end = mem + page;
  for (int n = 0; n < 16; ++n) {
    const __mmask16 k = (__mmask16)((1u << n) - 1u);
    float* f = reinterpret_cast<float*>(end) - n;
    for (int j = 0; j < n; ++j) f[j] = (float)(j + 1);
    float out[16];
    lanes(_mm512_maskz_loadu_ps(k, f), out);
    for (int j = 0; j < 16; ++j) CHECK(out[j] == (j < n ? (float)(j + 1) : 0.0f), "_mm512_maskz_loadu_ps n=%d lane %d", n, j);
    float src[16];
    for (int j = 0; j < 16; ++j) src[j] = -(float)j;
    std::memset(end - 64, 0x5a, 64);
    _mm512_mask_storeu_ps(f, k, vec(src));
    for (int j = 0; j < n; ++j) CHECK(f[j] == -(float)j, "_mm512_mask_storeu_ps n=%d lane %d", n, j);
    for (char* c = end - 64; c < reinterpret_cast<char*>(f); ++c) CHECK(*c == 0x5a, "_mm512_mask_storeu_ps wrote before its lanes");

    uint16_t* h = reinterpret_cast<uint16_t*>(end) - n;
    for (int j = 0; j < n; ++j) h[j] = (uint16_t)(0xabc0 + j);
    const __m256i hv = _mm256_maskz_loadu_epi16(k, h);
    uint16_t hout[16];
    std::memcpy(hout, &hv, 32);
    for (int j = 0; j < 16; ++j) CHECK(hout[j] == (j < n ? 0xabc0 + j : 0), "_mm256_maskz_loadu_epi16 n=%d lane %d", n, j);
    uint16_t hs[16];
    for (int j = 0; j < 16; ++j) hs[j] = (uint16_t)(0x1200 + j);
    __m256i hsv;
    std::memcpy(&hsv, hs, 32);
    std::memset(end - 64, 0x5a, 64);
    _mm256_mask_storeu_epi16(h, k, hsv);
    for (int j = 0; j < n; ++j) CHECK(h[j] == 0x1200 + j, "_mm256_mask_storeu_epi16 n=%d lane %d", n, j);
    for (char* c = end - 64; c < reinterpret_cast<char*>(h); ++c) CHECK(*c == 0x5a, "_mm256_mask_storeu_epi16 wrote before its lanes");
  }
  munmap(mem, 2 * page);
}

}  // namespace

int main() {
  std::mt19937 rng(2026);
  check_bf16(rng);
  check_f16(rng);
  check_dpbf16();
  check_arith();
  check_int();
  check_masked();
  check_int16_conversions();
  std::printf("simde shims: %s: %d checks, %d failed\n", g_failures ? "FAILED" : "OK", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
