/* The avx2 kernel set's vector vocabulary (AVX2, FMA, F16C): 256-bit vectors of the compute
 * type, and bn_d16, the sixteen double accumulators of every reduction, as four 256-bit
 * vectors. Chosen by eltype.h; the part after the guard is read once per element type. */
#ifndef BN_SIMD_AVX2_H
#define BN_SIMD_AVX2_H

#include "x86.h"

/* Sixteen double accumulators: lane k sums the elements k mod 16 of a run, or channel k of a
 * block of 16. Each lane does the same operations in the same order as avx512.h's, and
 * bn_d16_hsum adds the lanes in one fixed order, so both sets give the same bits. */
typedef struct bn_d16 {
    __m256d q[4]; /* lanes 0-3, 4-7, 8-11, 12-15 */
} bn_d16;
static inline bn_d16 bn_d16_of(__m256d a, __m256d b, __m256d c, __m256d d)
{
    bn_d16 r;
    r.q[0] = a, r.q[1] = b, r.q[2] = c, r.q[3] = d;
    return r;
}
static inline bn_d16 bn_d16_set1(double v)
{
    __m256d a = _mm256_set1_pd(v);
    return bn_d16_of(a, a, a, a);
}
static inline bn_d16 bn_d16_loadu(const double *p)
{
    return bn_d16_of(_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4), _mm256_loadu_pd(p + 8),
                     _mm256_loadu_pd(p + 12));
}
static inline void bn_d16_storeu(double *p, bn_d16 v)
{
    _mm256_storeu_pd(p, v.q[0]), _mm256_storeu_pd(p + 4, v.q[1]);
    _mm256_storeu_pd(p + 8, v.q[2]), _mm256_storeu_pd(p + 12, v.q[3]);
}
static inline bn_d16 bn_d16_add(bn_d16 a, bn_d16 b)
{
    return bn_d16_of(_mm256_add_pd(a.q[0], b.q[0]), _mm256_add_pd(a.q[1], b.q[1]),
                     _mm256_add_pd(a.q[2], b.q[2]), _mm256_add_pd(a.q[3], b.q[3]));
}
static inline bn_d16 bn_d16_sub(bn_d16 a, bn_d16 b)
{
    return bn_d16_of(_mm256_sub_pd(a.q[0], b.q[0]), _mm256_sub_pd(a.q[1], b.q[1]),
                     _mm256_sub_pd(a.q[2], b.q[2]), _mm256_sub_pd(a.q[3], b.q[3]));
}
/* a * b + c */
static inline bn_d16 bn_d16_fma(bn_d16 a, bn_d16 b, bn_d16 c)
{
    return bn_d16_of(_mm256_fmadd_pd(a.q[0], b.q[0], c.q[0]),
                     _mm256_fmadd_pd(a.q[1], b.q[1], c.q[1]),
                     _mm256_fmadd_pd(a.q[2], b.q[2], c.q[2]),
                     _mm256_fmadd_pd(a.q[3], b.q[3], c.q[3]));
}
/* lanes 0-3 only (a run's tail of whole 4-vectors): acc += e, acc += e * f */
static inline bn_d16 bn_d16_add4(bn_d16 acc, bn_d4 e)
{
    acc.q[0] = _mm256_add_pd(acc.q[0], e);
    return acc;
}
static inline bn_d16 bn_d16_fma4(bn_d16 acc, bn_d4 e, bn_d4 f)
{
    acc.q[0] = _mm256_fmadd_pd(e, f, acc.q[0]);
    return acc;
}
static inline double bn_d16_hsum(bn_d16 v) { return bn_d4x4_hsum(v.q[0], v.q[1], v.q[2], v.q[3]); }
#define BN_LOAD16D(p) \
    bn_d16_of(BN_LOAD4D(p), BN_LOAD4D((p) + 4), BN_LOAD4D((p) + 8), BN_LOAD4D((p) + 12))

/* Masked reductions: lanes whose mask byte is 0 become +0.0, which leaves an accumulator
 * unchanged (none holds -0.0: sums start at +0.0). bn_d4_keep takes 4 mask bytes,
 * bn_d16_keep 16. */
static inline bn_d4 bn_d4_keep(bn_d4 e, const unsigned char *mb)
{
    int32_t w;
    __m256i z;
    memcpy(&w, mb, 4);
    z = _mm256_cmpeq_epi64(_mm256_cvtepu8_epi64(_mm_cvtsi32_si128(w)), _mm256_setzero_si256());
    return _mm256_andnot_pd(_mm256_castsi256_pd(z), e);
}
static inline bn_d16 bn_d16_keep(bn_d16 e, const unsigned char *mb)
{
    return bn_d16_of(bn_d4_keep(e.q[0], mb), bn_d4_keep(e.q[1], mb + 4),
                     bn_d4_keep(e.q[2], mb + 8), bn_d4_keep(e.q[3], mb + 12));
}

#endif

/* Per element type: the compute-type vector BN_V (see eltype.h for the vocabulary) and
 * vkeep_<type>, BN_V's lanes whose mask byte (BN_W of them at mb) is 0 made +0.0. */
#define BN_SIMD 1
#define BN_AVX512 0
#if BN_KIND == BN_KIND_F64
#define BN_V __m256d
#define BN_W 4
#define BN_VLD _mm256_loadu_pd
#define BN_VST _mm256_storeu_pd
#define BN_VLDC _mm256_loadu_pd
#define BN_VSET1 _mm256_set1_pd
#define BN_VSUB _mm256_sub_pd
#define BN_VMUL _mm256_mul_pd
#define BN_VFMA _mm256_fmadd_pd
#define BN_VADD _mm256_add_pd
#define BN_VMAX _mm256_max_pd
#define BN_LOAD4D(p) _mm256_loadu_pd(p)
#define BN_VSTNT _mm256_stream_pd
#define BN_CAN_STREAM 1
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    return bn_d4_keep(v, mb);
}
#else
#include "x86_ps256.h"
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    __m256i z = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mb)),
                                   _mm256_setzero_si256());
    return _mm256_andnot_ps(_mm256_castsi256_ps(z), v);
}
#endif
