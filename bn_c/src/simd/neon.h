/* The neon kernel set's vector vocabulary (AArch64 Advanced SIMD): 128-bit vectors of the
 * compute type (4 float32 lanes, or 2 float64), float16 through NEON's conversions, bfloat16
 * by integer shifts, and bn_d16 as eight 2-lane double vectors. Chosen by eltype.h; the part
 * after the guard is read once per element type.
 *
 * Same bits as avx2.h and avx512.h: each of the sixteen accumulator lanes does the same
 * operations in the same order, bn_d16_hsum adds them in the same fixed order, the
 * elementwise lanes and tails fuse the same multiply-adds (vfmaq is fused, as vfmadd), and
 * BN_VMAX returns its second argument when either is NaN, as maxps. */
#ifndef BN_SIMD_NEON_H
#define BN_SIMD_NEON_H

#include <arm_neon.h>
#include <stdint.h>
#include <string.h>

/* Four double lanes (a run's tail of whole 4-vectors, added into lanes 0-3 of a bn_d16). */
typedef struct bn_d4 {
    float64x2_t lo, hi; /* lanes 0-1, 2-3 */
} bn_d4;
static inline bn_d4 bn_d4_of(float64x2_t lo, float64x2_t hi)
{
    bn_d4 r;
    r.lo = lo, r.hi = hi;
    return r;
}
static inline bn_d4 bn_d4_set1(double v) { return bn_d4_of(vdupq_n_f64(v), vdupq_n_f64(v)); }
static inline bn_d4 bn_d4_sub(bn_d4 a, bn_d4 b)
{
    return bn_d4_of(vsubq_f64(a.lo, b.lo), vsubq_f64(a.hi, b.hi));
}
/* 4 float32 widened */
static inline bn_d4 bn_d4_of_f32x4(float32x4_t v)
{
    return bn_d4_of(vcvt_f64_f32(vget_low_f32(v)), vcvt_high_f64_f32(v));
}

/* Non-temporal stores are not used on this set (BN_CAN_STREAM 0); nothing to fence. */
#define BN_SFENCE() ((void)0)

/* Sixteen double accumulators, lane k as in avx2.h: q[i] holds lanes 2i and 2i + 1. */
typedef struct bn_d16 {
    float64x2_t q[8];
} bn_d16;
static inline bn_d16 bn_d16_set1(double v)
{
    bn_d16 r;
    int i;
    for (i = 0; i < 8; ++i) r.q[i] = vdupq_n_f64(v);
    return r;
}
static inline bn_d16 bn_d16_loadu(const double *p)
{
    bn_d16 r;
    int i;
    for (i = 0; i < 8; ++i) r.q[i] = vld1q_f64(p + 2 * i);
    return r;
}
static inline void bn_d16_storeu(double *p, bn_d16 v)
{
    int i;
    for (i = 0; i < 8; ++i) vst1q_f64(p + 2 * i, v.q[i]);
}
static inline bn_d16 bn_d16_add(bn_d16 a, bn_d16 b)
{
    int i;
    for (i = 0; i < 8; ++i) a.q[i] = vaddq_f64(a.q[i], b.q[i]);
    return a;
}
static inline bn_d16 bn_d16_sub(bn_d16 a, bn_d16 b)
{
    int i;
    for (i = 0; i < 8; ++i) a.q[i] = vsubq_f64(a.q[i], b.q[i]);
    return a;
}
/* a * b + c */
static inline bn_d16 bn_d16_fma(bn_d16 a, bn_d16 b, bn_d16 c)
{
    int i;
    for (i = 0; i < 8; ++i) c.q[i] = vfmaq_f64(c.q[i], a.q[i], b.q[i]);
    return c;
}
/* s + e for the statistics' sums (x86.h takes them as fma(e, 1, s) for its adders' sake;
 * here, unmeasured, a plain add) */
#define bn_d16_sum(s, e, one) ((void)(one), bn_d16_add((s), (e)))
/* lanes 0-3 only: acc += e, acc += e * f */
static inline bn_d16 bn_d16_add4(bn_d16 acc, bn_d4 e)
{
    acc.q[0] = vaddq_f64(acc.q[0], e.lo), acc.q[1] = vaddq_f64(acc.q[1], e.hi);
    return acc;
}
static inline bn_d16 bn_d16_fma4(bn_d16 acc, bn_d4 e, bn_d4 f)
{
    acc.q[0] = vfmaq_f64(acc.q[0], e.lo, f.lo), acc.q[1] = vfmaq_f64(acc.q[1], e.hi, f.hi);
    return acc;
}
/* x86.h's bn_d4x4_hsum order on the four 4-lane quarters (q[0..1], q[2..3], q[4..5],
 * q[6..7]): t = (Q0 + Q1) + (Q2 + Q3) lane by lane, then (t0 + t2) + (t1 + t3). */
static inline double bn_d16_hsum(bn_d16 v)
{
    float64x2_t t01 = vaddq_f64(vaddq_f64(v.q[0], v.q[2]), vaddq_f64(v.q[4], v.q[6]));
    float64x2_t t23 = vaddq_f64(vaddq_f64(v.q[1], v.q[3]), vaddq_f64(v.q[5], v.q[7]));
    float64x2_t s = vaddq_f64(t01, t23);
    return vgetq_lane_f64(s, 0) + vgetq_lane_f64(s, 1);
}
#define BN_LOAD16D(p)                                                                             \
    bn_d16_of4(BN_LOAD4D(p), BN_LOAD4D((p) + 4), BN_LOAD4D((p) + 8), BN_LOAD4D((p) + 12))
static inline bn_d16 bn_d16_of4(bn_d4 a, bn_d4 b, bn_d4 c, bn_d4 d)
{
    bn_d16 r;
    r.q[0] = a.lo, r.q[1] = a.hi, r.q[2] = b.lo, r.q[3] = b.hi;
    r.q[4] = c.lo, r.q[5] = c.hi, r.q[6] = d.lo, r.q[7] = d.hi;
    return r;
}

/* Masked reductions, as in avx2.h: lanes whose mask byte is 0 become +0.0. */
static inline float64x2_t bn_d2_keep(float64x2_t e, const unsigned char *mb)
{
    /* two bytes, each widened to an all-ones or all-zeros 64-bit lane */
    uint64x2_t k = vcombine_u64(vcreate_u64(mb[0] ? ~0ull : 0ull), vcreate_u64(mb[1] ? ~0ull : 0ull));
    return vreinterpretq_f64_u64(vandq_u64(vreinterpretq_u64_f64(e), k));
}
static inline bn_d4 bn_d4_keep(bn_d4 e, const unsigned char *mb)
{
    return bn_d4_of(bn_d2_keep(e.lo, mb), bn_d2_keep(e.hi, mb + 2));
}
static inline bn_d16 bn_d16_keep(bn_d16 e, const unsigned char *mb)
{
    int i;
    for (i = 0; i < 8; ++i) e.q[i] = bn_d2_keep(e.q[i], mb + 2 * i);
    return e;
}

/* float16 and bfloat16 storage, 4 values to and from float32 */
static inline float32x4_t bn_load4_f16(const uint16_t *p)
{
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}
static inline void bn_store4_f16(uint16_t *p, float32x4_t v)
{
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v)));
}
static inline float32x4_t bn_load4_bf16(const uint16_t *p)
{
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}
/* round to nearest even; NaN stays NaN (quiet), as bn_f32_to_bf16 */
static inline void bn_store4_bf16(uint16_t *p, float32x4_t v)
{
    uint32x4_t u = vreinterpretq_u32_f32(v);
    uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fff)), odd);
    uint32x4_t nan = vmvnq_u32(vceqq_f32(v, v));
    r = vbslq_u32(nan, vorrq_u32(u, vdupq_n_u32(0x00400000)), r);
    vst1_u16(p, vshrn_n_u32(r, 16));
}

/* 4 mask bytes to 4 all-ones or all-zeros 32-bit lanes */
static inline uint32x4_t bn_keep_mask4(const unsigned char *mb)
{
    uint32_t w;
    memcpy(&w, mb, 4);
    return vtstq_u32(vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(w)))),
                     vdupq_n_u32(0xffffffffu));
}

#endif

/* Per element type: BN_V and its vocabulary (see eltype.h) and vkeep_<type> (lanes whose
 * mask byte is 0 made +0.0). */
#define BN_SIMD 1
#define BN_AVX512 0
#define BN_VBYTES 16
#if BN_KIND == BN_KIND_F64
#define BN_V float64x2_t
#define BN_W 2
#define BN_VLD vld1q_f64
#define BN_VST vst1q_f64
#define BN_VLDC vld1q_f64
#define BN_VSET1 vdupq_n_f64
#define BN_VSUB vsubq_f64
#define BN_VMUL vmulq_f64
#define BN_VFMA(a, b, c) vfmaq_f64(c, a, b)
#define BN_VADD vaddq_f64
#define BN_VMAX(a, b) vbslq_f64(vcgtq_f64(a, b), a, b)
#define BN_LOAD4D(p) bn_d4_of(vld1q_f64(p), vld1q_f64((p) + 2))
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    return bn_d2_keep(v, mb);
}
#else
#define BN_V float32x4_t
#define BN_W 4
#define BN_VLDC vld1q_f32
#define BN_VSET1 vdupq_n_f32
#define BN_VSUB vsubq_f32
#define BN_VMUL vmulq_f32
#define BN_VFMA(a, b, c) vfmaq_f32(c, a, b)
#define BN_VADD vaddq_f32
#define BN_VMAX(a, b) vbslq_f32(vcgtq_f32(a, b), a, b)
#if BN_KIND == BN_KIND_F32
#define BN_VLD vld1q_f32
#define BN_VST vst1q_f32
#elif BN_KIND == BN_KIND_F16
#define BN_VLD bn_load4_f16
#define BN_VST bn_store4_f16
#else
#define BN_VLD bn_load4_bf16
#define BN_VST bn_store4_bf16
#endif
#define BN_LOAD4D(p) bn_d4_of_f32x4(BN_VLD(p))
static inline BN_V BN_CAT2(vkeep, BN_TN)(BN_V v, const unsigned char *mb)
{
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), bn_keep_mask4(mb)));
}
#endif
