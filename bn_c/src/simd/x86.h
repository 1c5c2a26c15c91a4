/* What the two x86 kernel sets (avx2.h, avx512.h) share: 4-lane double vectors (bn_d4), the
 * fixed-order sum of sixteen lanes given as four bn_d4, 8 and 4 float16/bfloat16 values to and
 * from float32, and the fence after non-temporal stores. */
#ifndef BN_SIMD_X86_H
#define BN_SIMD_X86_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* Four double lanes: a run's tail of whole 4-vectors, added into lanes 0-3 of a bn_d16. */
typedef __m256d bn_d4;
#define bn_d4_set1 _mm256_set1_pd
#define bn_d4_sub _mm256_sub_pd

#define BN_SFENCE() _mm_sfence()

/* s + e for the statistics' sums, as fma(e, 1, s): the same bits (one rounding of an exact
 * sum), issued to the multiply-add units. On AMD Zen cores the adders also take these loops'
 * conversions and subtractions while the multiply-add units idle: one thread on Zen 4, the
 * statistics of (64, 128), (8, 32, 8, 8) and (32, 64, 28, 28) took 13-19% less time with
 * AVX2 and 3-6% less with AVX-512. Not in the backward's sums, whose multiply-add units are
 * busy already (there it made AVX2 3-10% slower). */
#define bn_d16_sum(s, e, one) bn_d16_fma((e), (one), (s))

/* ((q0 + q1) + (q2 + q3)), then (v0 + v2) + (v1 + v3) of that: one fixed order, so every
 * kernel set that sums its sixteen lanes through here gives the same bits */
static inline double bn_d4x4_hsum(__m256d q0, __m256d q1, __m256d q2, __m256d q3)
{
    __m256d t = _mm256_add_pd(_mm256_add_pd(q0, q1), _mm256_add_pd(q2, q3));
    __m128d lo = _mm256_castpd256_pd128(t), hi = _mm256_extractf128_pd(t, 1);
    __m128d s = _mm_add_pd(lo, hi);
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

static inline __m256 bn_load8_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline void bn_store8_f16(uint16_t *p, __m256 v)
{
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

static inline __m128 bn_load4_f16(const uint16_t *p)
{
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
}

static inline __m256 bn_load8_bf16(const uint16_t *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline __m128 bn_load4_bf16(const uint16_t *p)
{
    __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm_castsi128_ps(_mm_slli_epi32(w, 16));
}

/* round to nearest even; NaN stays NaN (quiet), as bn_f32_to_bf16 */
static inline void bn_store8_bf16(uint16_t *p, __m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    /* packus works within 128-bit lanes: gather the two low quadwords */
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(r));
}

#endif
