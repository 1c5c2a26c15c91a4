/* The element type of one instantiation of the kernel templates, chosen by BN_KIND before
 * including a *_impl.h file. Defines:
 *   BN_T   storage type            BN_TN  name suffix (f32, f64, f16, bf16)
 *   BN_CT  compute type of the elementwise passes (float, or double for f64)
 *   BN_LD(p) / BN_ST(p, v)  load one element as BN_CT / store one
 * and, from the ISA header it includes (simd/avx2.h, simd/avx512.h, simd/neon.h;
 * simd/scalar.h: BN_SIMD 0),
 * vectors of BN_CT:
 *   BN_V, BN_W (lanes), BN_VLD(p) / BN_VST(p, v) from/to storage, BN_VLDC(p) from a BN_CT array,
 *   BN_VSET1, BN_VSUB, BN_VMUL, BN_VFMA, BN_VADD, BN_VMAX (max(a, b): b when either is NaN),
 *   BN_LOAD4D(p)  4 elements widened to double, for the float64 accumulators,
 *   BN_VSTS(stream, p, v)  a store that is non-temporal when `stream` (p aligned to
 *   BN_VBYTES), BN_CAN_STREAM whether this type has such stores (float32, float64).
 * With AVX-512 (BN_AVX512), float32 and float64 use 512-bit vectors, and BN_VMASK says that
 * BN_VLD_N(p, r) / BN_VST_N(p, v, r) load and store the first r < BN_W lanes (masked tails);
 * BN_LOAD8D(p) widens 8 elements of any type to a 512-bit double vector. Every lane computes
 * what the scalar code computes, so the vector width never changes a result. The ISA headers
 * also give vkeep_<type> (masked lanes made +0.0), and, once, the reductions' bn_d16 (sixteen
 * double accumulators), bn_d4 (four) and BN_SFENCE().
 * No include guard: included once per instantiation. */
#include <float.h>

#include "half.h"

#undef BN_T
#undef BN_TN
#undef BN_CT
#undef BN_CT_MAX
#undef BN_CT_MIN
#undef BN_CT_HALF_ULP_MAX
#undef BN_LD
#undef BN_ST
#undef BN_SFMA
#undef BN_V
#undef BN_W
#undef BN_VLD
#undef BN_VST
#undef BN_VLDC
#undef BN_VSET1
#undef BN_VSUB
#undef BN_VMUL
#undef BN_VFMA
#undef BN_VADD
#undef BN_VMAX
#undef BN_LOAD4D
#undef BN_SIMD
#undef BN_AVX512
#undef BN_VSTNT
#undef BN_VSTS
#undef BN_CAN_STREAM
#undef BN_VBYTES
#undef BN_VMASK
#undef BN_VLD_N
#undef BN_VST_N
#undef BN_VBLEND_LAST
#undef BN_LOAD8D

#if BN_KIND == BN_KIND_F64
#define BN_T double
#define BN_TN f64
#define BN_CT double
#define BN_CT_MAX DBL_MAX /* the compute type's largest and smallest normal magnitudes */
#define BN_CT_MIN DBL_MIN
#define BN_CT_HALF_ULP_MAX 0x1p970 /* half the spacing of numbers at BN_CT_MAX */
#define BN_SFMA fma
#else
#define BN_CT float
#define BN_CT_MAX FLT_MAX
#define BN_CT_MIN FLT_MIN
#define BN_CT_HALF_ULP_MAX 0x1p103
#define BN_SFMA fmaf
#endif

#if BN_KIND == BN_KIND_F32
#define BN_T float
#define BN_TN f32
#elif BN_KIND == BN_KIND_F16
#define BN_T uint16_t
#define BN_TN f16
#elif BN_KIND == BN_KIND_BF16
#define BN_T uint16_t
#define BN_TN bf16
#endif

#if BN_KIND == BN_KIND_F16
#define BN_LD(p) bn_f16_to_f32(*(p))
#define BN_ST(p, v) (*(p) = bn_f32_to_f16(v))
#elif BN_KIND == BN_KIND_BF16
#define BN_LD(p) bn_bf16_to_f32(*(p))
#define BN_ST(p, v) (*(p) = bn_f32_to_bf16(v))
#else
#define BN_LD(p) (*(p))
#define BN_ST(p, v) (*(p) = (v))
#endif

/* The vector vocabulary of the kernel set being compiled: one header per ISA (simd/), chosen
 * by the compiler flags that meson gives each set (on AArch64, where every compiler targets
 * NEON, by BN_ISA_NEON: the baseline set there stays scalar). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "simd/avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "simd/avx2.h"
#elif defined(BN_ISA_NEON) && defined(__aarch64__) && defined(__ARM_NEON)
#include "simd/neon.h"
#elif defined(BN_ISA_NEON)
#error "the neon kernel set needs AArch64 NEON (arm_neon.h, __ARM_NEON)"
#else
#include "simd/scalar.h"
#endif
#ifndef BN_CAN_STREAM
#define BN_CAN_STREAM 0
#endif
#if BN_SIMD
#if !BN_CAN_STREAM
#define BN_VSTNT BN_VST
#endif
#define BN_VSTS(stream, p, v) ((stream) ? BN_VSTNT(p, v) : BN_VST(p, v))
#endif
/* Bytes of one vector, the alignment non-temporal stores need. */
#ifndef BN_VBYTES
#define BN_VBYTES 32
#endif
#ifndef BN_VMASK
#define BN_VMASK 0
#endif
#define BN_MISALIGNED(p) ((uintptr_t)(p) & (BN_VBYTES - 1))
/* elements from p, misaligned, to the next vector boundary */
#define BN_TO_BOUNDARY(p) ((ptrdiff_t)((BN_VBYTES - BN_MISALIGNED(p)) / sizeof(BN_T)))
