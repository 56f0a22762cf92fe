// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// and the deterministic uniform/Gaussian transforms built on it.
//
// This header is the single definition shared by the CPU path (csrc/cpu) and the CUDA
// kernels (csrc/cuda): the same (key, counter) must give bit-identical normals on both.
// To make that possible the Gaussian transform uses only IEEE-754 correctly rounded
// operations (+, -, *, /, sqrt and fused multiply-add, each called explicitly) in a fixed
// order, never the platform's log/sin/cos, whose last-bit results differ between glibc
// and CUDA's libdevice. Translation units that include it must not contract other a*b+c
// into FMA themselves (host: -ffp-contract=off; nvcc: --fmad=false for the noise
// kernels): see CMakeLists.txt.
#pragma once

#include <cmath>
#include <cstdint>

#include "hostdevice.hpp"

namespace dpfc {

struct Philox4x32 {
  uint32_t v[4];
};

namespace detail {
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

DPFC_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}
}  // namespace detail

// Ten rounds of Philox4x32 on counter c with key (k0, k1).
DPFC_HD Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += detail::kPhiloxW0;
      k1 += detail::kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo32(detail::kPhiloxM0, c.v[0], &hi0, &lo0);
    detail::mulhilo32(detail::kPhiloxM1, c.v[2], &hi1, &lo1);
    Philox4x32 next;
    next.v[0] = hi1 ^ c.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ c.v[3] ^ k1;
    next.v[3] = lo0;
    c = next;
  }
  return c;
}

// A 128-bit user key is spread over Philox's 64-bit key and the upper 64 bits of its
// 128-bit counter; the lower 64 counter bits index blocks within one key. Every block
// yields two normals. Callers own the block index space: a (key, block) pair must
// never be used for two releases.
struct NoiseKey {
  uint32_t k0, k1;  // Philox key = key bits 0..63
  uint32_t c2, c3;  // counter words 2, 3 = key bits 64..127
};

DPFC_HD Philox4x32 philox_block(const NoiseKey& key, uint64_t block) {
  Philox4x32 c;
  c.v[0] = static_cast<uint32_t>(block);
  c.v[1] = static_cast<uint32_t>(block >> 32);
  c.v[2] = key.c2;
  c.v[3] = key.c3;
  return philox4x32_10(c, key.k0, key.k1);
}

// Uniform in the open interval (0, 1) from 52 random bits: (k + 1/2) 2^-52, exact in
// double precision (53 significant bits), so never 0 or 1.
DPFC_HD double uniform_open52(uint32_t hi, uint32_t lo) {
  const uint64_t k = ((static_cast<uint64_t>(hi) << 32) | lo) >> 12;
  return (static_cast<double>(k) + 0.5) * 2.220446049250313080847263336181640625e-16;
}

namespace detail {
DPFC_HD uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  __builtin_memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

DPFC_HD double bits_double(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  __builtin_memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// a * b + c rounded once: IEEE-754 fusedMultiplyAdd on both sides (CUDA's __fma_rn;
// std::fma, which glibc maps to the FMA instruction where the CPU has one), so the
// result is the same bits on host and device and the series cost one operation a term.
DPFC_HD double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Natural log of u in (0, 1], using only correctly rounded arithmetic.
// u = m 2^e with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m-1)/(m+1),
// |s| <= 0.1716, so 12 odd terms of the atanh series reach double precision.
DPFC_HD double log_unit(double u) {
  const uint64_t bits = double_bits(u);
  int e = static_cast<int>((bits >> 52) & 0x7FF) - 1023;
  double m = bits_double((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  if (m > 1.4142135623730951) {
    m = m * 0.5;
    e += 1;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  // Horner form of sum_{k=0}^{11} s2^k / (2k + 1).
  double p = 1.0 / 23.0;
  p = fma_rn(p, s2, 1.0 / 21.0);
  p = fma_rn(p, s2, 1.0 / 19.0);
  p = fma_rn(p, s2, 1.0 / 17.0);
  p = fma_rn(p, s2, 1.0 / 15.0);
  p = fma_rn(p, s2, 1.0 / 13.0);
  p = fma_rn(p, s2, 1.0 / 11.0);
  p = fma_rn(p, s2, 1.0 / 9.0);
  p = fma_rn(p, s2, 1.0 / 7.0);
  p = fma_rn(p, s2, 1.0 / 5.0);
  p = fma_rn(p, s2, 1.0 / 3.0);
  p = fma_rn(p, s2, 1.0);
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2, upper bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
  const double de = static_cast<double>(e);
  // de * kLn2Hi is exact (kLn2Hi has 32 significant bits, |e| < 2^11).
  return de * kLn2Hi + fma_rn(2.0 * s, p, de * kLn2Lo);
}

// sin and cos of x for |x| <= pi/4 by their Taylor series (Horner), double precision.
DPFC_HD double sin_small(double x) {
  const double x2 = x * x;
  double p = -1.0 / 1307674368000.0;      // -1/15!
  p = fma_rn(p, x2, 1.0 / 6227020800.0);  // 1/13!
  p = fma_rn(p, x2, -1.0 / 39916800.0);   // -1/11!
  p = fma_rn(p, x2, 1.0 / 362880.0);      // 1/9!
  p = fma_rn(p, x2, -1.0 / 5040.0);       // -1/7!
  p = fma_rn(p, x2, 1.0 / 120.0);         // 1/5!
  p = fma_rn(p, x2, -1.0 / 6.0);          // -1/3!
  return fma_rn(x, x2 * p, x);
}

DPFC_HD double cos_small(double x) {
  const double x2 = x * x;
  double p = 1.0 / 20922789888000.0;        // 1/16!
  p = fma_rn(p, x2, -1.0 / 87178291200.0);  // -1/14!
  p = fma_rn(p, x2, 1.0 / 479001600.0);     // 1/12!
  p = fma_rn(p, x2, -1.0 / 3628800.0);      // -1/10!
  p = fma_rn(p, x2, 1.0 / 40320.0);         // 1/8!
  p = fma_rn(p, x2, -1.0 / 720.0);          // -1/6!
  p = fma_rn(p, x2, 1.0 / 24.0);            // 1/4!
  p = fma_rn(p, x2, -0.5);
  return fma_rn(x2, p, 1.0);
}

// (cos 2 pi t, sin 2 pi t) for t in (0, 1): octant reduction is exact because t carries
// at most 53 significant bits, then the small-angle series on |angle| <= pi/4.
DPFC_HD void sincos_2pi(double t, double* c, double* s) {
  const double t8 = t * 8.0;                              // exact
  const int oct = static_cast<int>(t8);                   // 0..7
  const int q = (oct + 1) >> 1;                           // nearest quarter turn: 0..4
  const double f = (t8 - 2.0 * q) * 0.125;                // t - q/4 in [-1/8, 1/8], exact
  const double a = f * 6.283185307179586476925286766559;  // 2 pi f in [-pi/4, pi/4]
  const double sa = sin_small(a);
  const double ca = cos_small(a);
  switch (q & 3) {
    case 0:
      *c = ca;
      *s = sa;
      break;
    case 1:
      *c = -sa;
      *s = ca;
      break;
    case 2:
      *c = -ca;
      *s = -sa;
      break;
    default:
      *c = sa;
      *s = -ca;
      break;
  }
}
}  // namespace detail

// Two independent standard normals from one Philox block (Box-Muller).
DPFC_HD void gaussian_pair(const Philox4x32& r, double* z0, double* z1) {
  const double u1 = uniform_open52(r.v[0], r.v[1]);
  const double u2 = uniform_open52(r.v[2], r.v[3]);
  const double radius = sqrt(-2.0 * detail::log_unit(u1));
  double c, s;
  detail::sincos_2pi(u2, &c, &s);
  *z0 = radius * c;
  *z1 = radius * s;
}

// The standard normal with global index i of a stream: block i / 2, half i % 2.
DPFC_HD double gaussian_at(const NoiseKey& key, uint64_t block0, uint64_t i) {
  double z0, z1;
  gaussian_pair(philox_block(key, block0 + (i >> 1)), &z0, &z1);
  return (i & 1) ? z1 : z0;
}

// Number of Philox blocks a stream of `count` normals consumes.
DPFC_HD uint64_t gaussian_blocks(uint64_t count) { return (count + 1) >> 1; }

// Symmetric noise layout: matrix b of a batch, upper triangle (i <= j) row-major.
// Normal index of (i, j) within one matrix of order d.
DPFC_HD uint64_t sym_index(uint64_t d, uint64_t i, uint64_t j) {
  return i * d - (i * (i - 1)) / 2 + (j - i);
}

// Entry (i, j) of symmetric noise with per-coordinate std `std` in the vectorisation
// v = (G_ii, sqrt(2) G_ij): diagonal N(0, std^2), off-diagonal N(0, std^2 / 2).
DPFC_HD double sym_noise_scale(double std, bool diagonal) {
  return diagonal ? std : std * 0.70710678118654752440;
}

}  // namespace dpfc
