/* float16 and bfloat16 <-> float32, one value at a time (8 at a time: simd/x86.h). Round to
 * nearest even; NaN stays NaN (quiet), inf stays inf, float16 subnormals are exact. */
#ifndef BN_HALF_H
#define BN_HALF_H

#include <stdint.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline uint32_t bn_bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bn_float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The CPU's own conversion where every target of the build has one (F16C on the x86 SIMD
 * sets, FCVT on AArch64), so that scalar tails convert as the vector loads and stores do. */
#if defined(__aarch64__) && defined(__ARM_FP16_FORMAT_IEEE)
#define BN_HALF_FCVT 1
#endif

static inline float bn_f16_to_f32(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(BN_HALF_FCVT)
    __fp16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
#else
    /* Move exponent and mantissa into place, rebias; inf/NaN and subnormals fixed up. */
    uint32_t u = (uint32_t)(h & 0x7fffu) << 13, exp = u & (0x7c00u << 13);
    u += (127u - 15u) << 23;
    if (exp == (0x7c00u << 13)) {
        u += (128u - 16u) << 23; /* inf or NaN */
    } else if (exp == 0) {       /* zero or subnormal: renormalize in float arithmetic */
        u += 1u << 23;
        u = bn_bits_of(bn_float_of(u) - bn_float_of(113u << 23));
    }
    return bn_float_of(u | ((uint32_t)(h & 0x8000u) << 16));
#endif
}

static inline uint16_t bn_f32_to_f16(float f)
{
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#elif defined(BN_HALF_FCVT)
    __fp16 v = (__fp16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
#else
    uint32_t u = bn_bits_of(f), sign = u & 0x80000000u, out;
    u ^= sign;
    if (u >= ((127u + 16u) << 23)) {           /* too large for float16: inf, or NaN */
        out = u > (255u << 23) ? 0x7e00u : 0x7c00u;
    } else if (u < (113u << 23)) {             /* float16 subnormal or zero */
        /* adding 0.5 * 2^-14 * 2^... aligns the 10 mantissa bits at the bottom; the float
         * addition rounds to nearest even */
        const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        out = bn_bits_of(bn_float_of(u) + bn_float_of(magic)) - magic;
    } else {                                   /* normal: rebias and round to nearest even */
        uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        out = u >> 13;
    }
    return (uint16_t)(out | (sign >> 16));
#endif
}

static inline float bn_bf16_to_f32(uint16_t h) { return bn_float_of((uint32_t)h << 16); }

static inline uint16_t bn_f32_to_bf16(float f)
{
    uint32_t u = bn_bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u | 0x00400000u) >> 16); /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#endif
