/* Runtime dispatch: picks, once, the best kernel set this CPU can run (or the one named by
 * BATCHNORM_ISA), and forwards the public bn_* calls to it. The only file that calls across
 * ISAs; compiled without any ISA flag. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Every (element name, storage type) pair, and the signature of each operation. */
#define BN_ELEMENT_TYPES(X) X(f32, float) X(f64, double) X(f16, uint16_t) X(bf16, uint16_t)

#define BN_STATS_ARGS(T) (bn_shape s, const T *x, bn_strides xs, double *mean, double *var, const bn_options *opt)
#define BN_STATS_CALL (s, x, xs, mean, var, opt)
#define BN_TRAIN_ARGS(T)                                                                          \
    (bn_shape s, const T *x, bn_strides xs, T *y, bn_strides ys, const double *gamma,             \
     const double *beta, double eps, double *mean, double *var, const bn_options *opt)
#define BN_TRAIN_CALL (s, x, xs, y, ys, gamma, beta, eps, mean, var, opt)
#define BN_EVAL_ARGS(T)                                                                           \
    (bn_shape s, const T *x, bn_strides xs, T *y, bn_strides ys, const double *mean,              \
     const double *var, const double *gamma, const double *beta, double eps,                    \
     const bn_options *opt)
#define BN_EVAL_CALL (s, x, xs, y, ys, mean, var, gamma, beta, eps, opt)
#define BN_BACKWARD_ARGS(T)                                                                       \
    (bn_shape s, const T *dy, bn_strides dys, const T *x, bn_strides xs, T *dx, bn_strides dxs,   \
     const double *mean, const double *var, const double *gamma, double eps, int training,        \
     double *dgamma, double *dbeta, const bn_options *opt)
#define BN_BACKWARD_CALL (s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, training, dgamma, dbeta, opt)
#define BN_BACKWARD_TOTAL_ARGS(T)                                                                 \
    (bn_shape s, const T *dy, bn_strides dys, const T *x, bn_strides xs, T *dx, bn_strides dxs,   \
     const double *mean, const double *var, const double *gamma, double eps, double n,            \
     const double *sum_dy, const double *sum_dy_xhat)
#define BN_BACKWARD_TOTAL_CALL (s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, n, sum_dy, sum_dy_xhat)

#define BN_OPS(X, tn, T)                                                                          \
    X(stats, tn, BN_STATS_ARGS(T), BN_STATS_CALL)                                                 \
    X(forward_train, tn, BN_TRAIN_ARGS(T), BN_TRAIN_CALL)                                         \
    X(forward_eval, tn, BN_EVAL_ARGS(T), BN_EVAL_CALL)                                            \
    X(backward, tn, BN_BACKWARD_ARGS(T), BN_BACKWARD_CALL)                                       \
    X(backward_total, tn, BN_BACKWARD_TOTAL_ARGS(T), BN_BACKWARD_TOTAL_CALL)

/* The table of one kernel set. */
#define BN_FIELD(op, tn, args, call) int(*op##_##tn) args;
#define BN_FIELDS_OF_TYPE(tn, T) BN_OPS(BN_FIELD, tn, T)
typedef struct bn_kernels {
    const char *name;
    BN_ELEMENT_TYPES(BN_FIELDS_OF_TYPE)
} bn_kernels;

/* Declarations and table entries of each compiled kernel set. */
#define BN_DECLARE(op, tn, args, call) int BN_CAT3(bn_##op, tn, BN_DECL_ISA) args;
#define BN_DECLARE_OF_TYPE(tn, T) BN_OPS(BN_DECLARE, tn, T)
#define BN_ENTRY(op, tn, args, call) BN_CAT3(bn_##op, tn, BN_DECL_ISA),
#define BN_ENTRY_OF_TYPE(tn, T) BN_OPS(BN_ENTRY, tn, T)

#define BN_DECL_ISA baseline
BN_ELEMENT_TYPES(BN_DECLARE_OF_TYPE)
static const bn_kernels kernels_baseline = {"baseline", BN_ELEMENT_TYPES(BN_ENTRY_OF_TYPE)};
#undef BN_DECL_ISA
#ifdef BN_HAVE_AVX2
#define BN_DECL_ISA avx2
BN_ELEMENT_TYPES(BN_DECLARE_OF_TYPE)
static const bn_kernels kernels_avx2 = {"avx2", BN_ELEMENT_TYPES(BN_ENTRY_OF_TYPE)};
#undef BN_DECL_ISA
#endif
#ifdef BN_HAVE_AVX512
#define BN_DECL_ISA avx512
BN_ELEMENT_TYPES(BN_DECLARE_OF_TYPE)
static const bn_kernels kernels_avx512 = {"avx512", BN_ELEMENT_TYPES(BN_ENTRY_OF_TYPE)};
#undef BN_DECL_ISA
#endif
#ifdef BN_HAVE_NEON
#define BN_DECL_ISA neon
BN_ELEMENT_TYPES(BN_DECLARE_OF_TYPE)
static const bn_kernels kernels_neon = {"neon", BN_ELEMENT_TYPES(BN_ENTRY_OF_TYPE)};
#undef BN_DECL_ISA
#endif

/* Best last. */
static const bn_kernels *const all_kernels[] = {
    &kernels_baseline,
#ifdef BN_HAVE_AVX2
    &kernels_avx2,
#endif
#ifdef BN_HAVE_AVX512
    &kernels_avx512,
#endif
#ifdef BN_HAVE_NEON
    &kernels_neon,
#endif
};
#define BN_N_KERNELS ((int)(sizeof(all_kernels) / sizeof(all_kernels[0])))

/* CPU features, read from the CPU itself (cpuid) and the OS (xgetbv: whether it saves the
 * wide registers on a context switch), so that every compiler gets the same answer: MSVC has
 * no __builtin_cpu_supports. */
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
    int v[4];
    __cpuidex(v, (int)leaf, (int)sub);
    r[0] = (unsigned)v[0], r[1] = (unsigned)v[1], r[2] = (unsigned)v[2], r[3] = (unsigned)v[3];
}
static unsigned long long xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
/* The instruction, not _xgetbv: that one needs -mxsave on GCC and clang. */
static unsigned long long xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

enum { HAS_AVX2 = 1, HAS_AVX512 = 2 };

static int x86_features(void)
{
    unsigned r[4], max_leaf, ecx1, ebx7;
    unsigned long long xcr0;
    int have = 0;
    cpuid(0, 0, r);
    max_leaf = r[0];
    if (max_leaf < 7) return 0;
    cpuid(1, 0, r);
    ecx1 = r[2];
    /* OSXSAVE (27) before xgetbv: without it the instruction faults. */
    if (!(ecx1 & (1u << 27))) return 0;
    xcr0 = xgetbv0();
    cpuid(7, 0, r);
    ebx7 = r[1];
    /* avx2 set: AVX (ecx1 28), FMA (12), F16C (29), AVX2 (ebx7 5); XMM and YMM state saved. */
    if ((ecx1 & (1u << 28)) && (ecx1 & (1u << 12)) && (ecx1 & (1u << 29)) &&
        (ebx7 & (1u << 5)) && (xcr0 & 0x6) == 0x6) {
        have |= HAS_AVX2;
        /* avx512 set: F (16), DQ (17), BW (30), VL (31); opmask and ZMM state saved too. */
        if ((ebx7 & (1u << 16)) && (ebx7 & (1u << 17)) && (ebx7 & (1u << 30)) &&
            (ebx7 & (1u << 31)) && (xcr0 & 0xE6) == 0xE6)
            have |= HAS_AVX512;
    }
    return have;
}
#endif

/* AArch64: Advanced SIMD (with its float16 conversions) and floating point are part of the
 * architecture's base, and every OS that runs AArch64 code enables them; Linux still says so
 * in the auxiliary vector, which is asked where it exists. */
#if defined(__aarch64__) || defined(_M_ARM64)
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_FP
#define HWCAP_FP (1 << 0)
#endif
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
static int arm64_has_neon(void)
{
    unsigned long hw = getauxval(AT_HWCAP);
    return (hw & HWCAP_FP) && (hw & HWCAP_ASIMD);
}
#else
static int arm64_has_neon(void) { return 1; }
#endif
#endif

/* Can this CPU run this kernel set? */
static int cpu_supports(const char *name)
{
    if (strcmp(name, "baseline") == 0) return 1;
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
    if (strcmp(name, "avx2") == 0) return (x86_features() & HAS_AVX2) != 0;
    if (strcmp(name, "avx512") == 0) return (x86_features() & HAS_AVX512) != 0;
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
    if (strcmp(name, "neon") == 0) return arm64_has_neon();
#endif
    return 0;
}

static const bn_kernels *find_kernels(const char *name)
{
    int i;
    for (i = 0; i < BN_N_KERNELS; ++i)
        if (name && strcmp(all_kernels[i]->name, name) == 0 && cpu_supports(name))
            return all_kernels[i];
    return NULL;
}

/* The active kernel set, chosen at the first call (the Python package makes it at import) or
 * by bn_set_isa. Threads that race to the first call choose the same set; the atomic makes the
 * race well defined (an acquire load is a plain load on x86 and arm64). */
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__)
#include <stdatomic.h>
static const bn_kernels *_Atomic active = NULL;
#define LOAD_ACTIVE() atomic_load_explicit(&active, memory_order_acquire)
#define STORE_ACTIVE(k) atomic_store_explicit(&active, (k), memory_order_release)
#else
static const bn_kernels *volatile active = NULL;
#define LOAD_ACTIVE() active
#define STORE_ACTIVE(k) (active = (k))
#endif

static const bn_kernels *choose_kernels(void)
{
    const char *forced = getenv("BATCHNORM_ISA");
    const bn_kernels *k = forced && *forced ? find_kernels(forced) : NULL;
    int i;
    for (i = BN_N_KERNELS - 1; !k && i >= 0; --i)
        if (cpu_supports(all_kernels[i]->name)) k = all_kernels[i];
    return k;
}

static const bn_kernels *kernels(void)
{
    const bn_kernels *k = LOAD_ACTIVE();
    if (!k) {
        k = choose_kernels();
        STORE_ACTIVE(k);
    }
    return k;
}

const char *bn_active_isa(void) { return kernels()->name; }

int bn_isa_available(const char *name) { return find_kernels(name) != NULL; }

int bn_set_isa(const char *name)
{
    const bn_kernels *k = find_kernels(name);
    if (!k) return BN_ERR_ISA;
    STORE_ACTIVE(k);
    return BN_OK;
}

/* The public functions: forward to the active kernel set. */
#define BN_FORWARD(op, tn, args, call)                                                            \
    int bn_##op##_##tn args { return kernels()->op##_##tn call; }
#define BN_FORWARD_OF_TYPE(tn, T) BN_OPS(BN_FORWARD, tn, T)
BN_ELEMENT_TYPES(BN_FORWARD_OF_TYPE)
