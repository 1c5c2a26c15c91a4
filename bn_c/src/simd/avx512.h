/* The avx512 kernel set's vector vocabulary (AVX-512 F, BW, DQ, VL with AVX2, FMA, F16C):
 * 512-bit vectors for float32 and float64 with masked tails (BN_VMASK), 256-bit float32
 * vectors for float16/bfloat16 storage, and bn_d16 as two 512-bit vectors. Chosen by
 * eltype.h; the part after the guard is read once per element type. */
#ifndef BN_SIMD_AVX512_H
#define BN_SIMD_AVX512_H

#include "x86.h"

/* Sixteen double accumulators, lane k as in avx2.h: the same operations per lane in the same
 * order, and the same fixed-order sum, so both sets give the same bits. */
typedef struct bn_d16 {
    __m512d lo, hi; /* lanes 0-7, 8-15 */
} bn_d16;
static inline bn_d16 bn_d16_of(__m512d lo, __m512d hi)
{
    bn_d16 r;
    r.lo = lo, r.hi = hi;
    return r;
}
static inline bn_d16 bn_d16_set1(double v) { return bn_d16_of(_mm512_set1_pd(v), _mm512_set1_pd(v)); }
static inline bn_d16 bn_d16_loadu(const double *p)
{
    return bn_d16_of(_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8));
}
static inline void bn_d16_storeu(double *p, bn_d16 v)
{
    _mm512_storeu_pd(p, v.lo), _mm512_storeu_pd(p + 8, v.hi);
}
static inline bn_d16 bn_d16_add(bn_d16 a, bn_d16 b)
{
    return bn_d16_of(_mm512_add_pd(a.lo, b.lo), _mm512_add_pd(a.hi, b.hi));
}
static inline bn_d16 bn_d16_sub(bn_d16 a, bn_d16 b)
{
    return bn_d16_of(_mm512_sub_pd(a.lo, b.lo), _mm512_sub_pd(a.hi, b.hi));
}
/* a * b + c */
static inline bn_d16 bn_d16_fma(bn_d16 a, bn_d16 b, bn_d16 c)
{
    return bn_d16_of(_mm512_fmadd_pd(a.lo, b.lo, c.lo), _mm512_fmadd_pd(a.hi, b.hi, c.hi));
}
/* lanes 0-3 only (a run's tail of whole 4-vectors): acc += e, acc += e * f */
static inline bn_d16 bn_d16_add4(bn_d16 acc, bn_d4 e)
{
    acc.lo = _mm512_mask_add_pd(acc.lo, 0x0F, acc.lo, _mm512_castpd256_pd512(e));
    return acc;
}
static inline bn_d16 bn_d16_fma4(bn_d16 acc, bn_d4 e, bn_d4 f)
{
    acc.lo = _mm512_mask3_fmadd_pd(_mm512_castpd256_pd512(e), _mm512_castpd256_pd512(f), acc.lo,
                                   0x0F);
    return acc;
}
static inline double bn_d16_hsum(bn_d16 v)
{
    return bn_d4x4_hsum(_mm512_castpd512_pd256(v.lo), _mm512_extractf64x4_pd(v.lo, 1),
                        _mm512_castpd512_pd256(v.hi), _mm512_extractf64x4_pd(v.hi, 1));
}
#define BN_LOAD16D(p) bn_d16_of(BN_LOAD8D(p), BN_LOAD8D((p) + 8))

/* Masked reductions, as in avx2.h, with mask registers. */
static inline bn_d16 bn_d16_keep(bn_d16 e, const unsigned char *mb)
{
    __m128i b = _mm_loadu_si128((const __m128i *)mb);
    __mmask16 k = _mm_test_epi8_mask(b, b);
    return bn_d16_of(_mm512_maskz_mov_pd((__mmask8)k, e.lo),
                     _mm512_maskz_mov_pd((__mmask8)(k >> 8), e.hi));
}
static inline bn_d4 bn_d4_keep(bn_d4 e, const unsigned char *mb)
{
    int32_t w;
    __m128i b;
    memcpy(&w, mb, 4);
    b = _mm_cvtsi32_si128(w);
    return _mm256_maskz_mov_pd((__mmask8)_mm_test_epi8_mask(b, b), e);
}

#endif

/* Per element type: BN_V and its vocabulary (see eltype.h), BN_LOAD8D (8 elements widened to
 * a 512-bit double vector), vkeep_<type> (lanes whose mask byte is 0 made +0.0) and, where
 * BN_VMASK, vkeep_n_<type> (the same for the first r < BN_W lanes; no byte past them read). */
#define BN_SIMD 1
#define BN_AVX512 1
#if BN_KIND == BN_KIND_F64
#define BN_V __m512d
#define BN_W 8
#define BN_VLD _mm512_loadu_pd
#define BN_VST _mm512_storeu_pd
#define BN_VLDC _mm512_loadu_pd
#define BN_VSET1 _mm512_set1_pd
#define BN_VSUB _mm512_sub_pd
#define BN_VMUL _mm512_mul_pd
#define BN_VFMA _mm512_fmadd_pd
#define BN_VADD _mm512_add_pd
#define BN_VMAX _mm512_max_pd
#define BN_LOAD4D(p) _mm256_loadu_pd(p)
#define BN_LOAD8D(p) _mm512_loadu_pd(p)
#define BN_VSTNT _mm512_stream_pd
#define BN_CAN_STREAM 1
#define BN_VBYTES 64
#define BN_VMASK 1
#define BN_VLD_N(p, r) _mm512_maskz_loadu_pd((__mmask8)((1u << (r)) - 1), p)
#define BN_VST_N(p, v, r) _mm512_mask_storeu_pd(p, (__mmask8)((1u << (r)) - 1), v)
/* a's lanes, but the last r (0 < r < BN_W) from b */
#define BN_VBLEND_LAST(a, b, r) _mm512_mask_blend_pd((__mmask8)(0xffu << (8 - (r))), a, b)
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    __m128i b = _mm_loadl_epi64((const __m128i *)mb);
    return _mm512_maskz_mov_pd((__mmask8)_mm_test_epi8_mask(b, b), v);
}
static inline BN_V BN_CAT2(vkeep_n, BN_TN)(BN_V v, const unsigned char *mb, ptrdiff_t r)
{
    __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << r) - 1), mb);
    return _mm512_maskz_mov_pd((__mmask8)_mm_test_epi8_mask(b, b), v);
}
#elif BN_KIND == BN_KIND_F32
#define BN_V __m512
#define BN_W 16
#define BN_VLD _mm512_loadu_ps
#define BN_VST _mm512_storeu_ps
#define BN_VLDC _mm512_loadu_ps
#define BN_VSET1 _mm512_set1_ps
#define BN_VSUB _mm512_sub_ps
#define BN_VMUL _mm512_mul_ps
#define BN_VFMA _mm512_fmadd_ps
#define BN_VADD _mm512_add_ps
#define BN_VMAX _mm512_max_ps
#define BN_LOAD4D(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define BN_LOAD8D(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define BN_VSTNT _mm512_stream_ps
#define BN_CAN_STREAM 1
#define BN_VBYTES 64
#define BN_VMASK 1
#define BN_VLD_N(p, r) _mm512_maskz_loadu_ps((__mmask16)((1u << (r)) - 1), p)
#define BN_VST_N(p, v, r) _mm512_mask_storeu_ps(p, (__mmask16)((1u << (r)) - 1), v)
#define BN_VBLEND_LAST(a, b, r) _mm512_mask_blend_ps((__mmask16)(0xffffu << (16 - (r))), a, b)
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    __m128i b = _mm_loadu_si128((const __m128i *)mb);
    return _mm512_maskz_mov_ps(_mm_test_epi8_mask(b, b), v);
}
static inline BN_V BN_CAT2(vkeep_n, BN_TN)(BN_V v, const unsigned char *mb, ptrdiff_t r)
{
    __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << r) - 1), mb);
    return _mm512_maskz_mov_ps(_mm_test_epi8_mask(b, b), v);
}
#else
#include "x86_ps256.h"
#if BN_KIND == BN_KIND_F16
#define BN_LOAD8D(p) _mm512_cvtps_pd(bn_load8_f16(p))
#else
#define BN_LOAD8D(p) _mm512_cvtps_pd(bn_load8_bf16(p))
#endif
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    __m128i b = _mm_loadl_epi64((const __m128i *)mb);
    return _mm256_maskz_mov_ps((__mmask8)_mm_test_epi8_mask(b, b), v);
}
#endif
