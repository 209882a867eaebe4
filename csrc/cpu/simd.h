#pragma once
// Eight floats at a time for the CPU norm kernels, with the conversions from and to bf16 and fp16.
// ATen's at::vec is not part of PyTorch's stable ABI, so this uses GCC/Clang vector extensions:
// the AVX2 copy of the kernels (-mavx2 -mfma -mf16c) compiles each operation to one ymm
// instruction, the baseline copy to two xmm ones. Internal linkage on purpose, as in norm_row.h:
// each copy keeps its own functions (a shared one could run AVX2 code on a CPU without it).
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// The AVX2 copy widens and narrows 16-bit floats with the instructions made for it: GCC lowers the
// vector extensions' conversions between 16- and 32-byte vectors lane group by lane group.
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define TORCHGC_SIMD_AVX2 1
#endif

namespace simd {
namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

constexpr int64_t kLanes = 8;

inline f32x8 splat(float v) { return f32x8{v, v, v, v, v, v, v, v}; }

template <typename V, typename P>
inline V load_bits(const P* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename P>
inline void store_bits(P* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

inline f32x8 load(const float* p) { return load_bits<f32x8>(p); }

// bf16 is the high half of a float: widen and shift.
inline f32x8 load(const c10::BFloat16* p) {
#ifdef TORCHGC_SIMD_AVX2
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (f32x8)_mm256_slli_epi32(wide, 16);  // a vector cast reinterprets the bits
#else
  const u32x8 wide = __builtin_convertvector(load_bits<u16x8>(p), u32x8) << 16;
  return (f32x8)wide;
#endif
}

// fp16 through F16C where the copy has it; the baseline copy converts lane by lane in plain C++
// (GCC's vector conversion would call libgcc's helpers, which only GCC 12's libgcc has).
inline f32x8 load(const c10::Half* p) {
#ifdef TORCHGC_SIMD_AVX2
  return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  f32x8 v;
  for (int i = 0; i < kLanes; ++i) {
    v[i] = static_cast<float>(p[i]);
  }
  return v;
#endif
}

inline void store(float* p, f32x8 v) { store_bits(p, v); }

// v's bf16 bits (in the low half of each lane), rounded to nearest even as c10::BFloat16 does; NaN
// stays a quiet NaN.
inline u32x8 bf16_bits(f32x8 v) {
  const u32x8 bits = (u32x8)v;
  const u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const i32x8 is_nan = v != v;
  return is_nan ? u32x8{} + 0x7FC0u : rounded;
}

inline void store(c10::BFloat16* p, f32x8 v) {
#ifdef TORCHGC_SIMD_AVX2
  const __m256i bits = (__m256i)bf16_bits(v);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);  // exact: every lane is below 2^16
#else
  store_bits(p, __builtin_convertvector(bf16_bits(v), u16x8));
#endif
}

inline void store(c10::Half* p, f32x8 v) {
#ifdef TORCHGC_SIMD_AVX2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kLanes; ++i) {
    p[i] = c10::Half(v[i]);
  }
#endif
}

// v rounded to T and back.
template <typename T>
inline f32x8 round_to(f32x8 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return (f32x8)(bf16_bits(v) << 16);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    c10::Half rounded[kLanes];
    store(rounded, v);
    return load(rounded);
  } else {
    return v;
  }
}

// a * b + c; the AVX2 copy contracts it to one fused multiply-add.
inline f32x8 fmadd(f32x8 a, f32x8 b, f32x8 c) { return a * b + c; }

// The lanes' sum in a fixed order, so results never depend on how rows are split.
inline float hsum(f32x8 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) {
    s += v[i];
  }
  return s;
}

}  // namespace
}  // namespace simd
