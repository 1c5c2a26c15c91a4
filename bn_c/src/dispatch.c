/* Runtime dispatch: picks, once, the best kernel set this CPU can run (or the one named by
 * BATCHNORM_ISA), and forwards the public bn_* calls to it. The only file that calls across
 * ISAs; compiled without any ISA flag. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BN_DECLARE_ISA(isa)                                                                       \
    int bn_stats_f32_##isa(bn_shape, const float *, bn_strides, double *, double *);              \
    int bn_stats_f64_##isa(bn_shape, const double *, bn_strides, double *, double *);             \
    int bn_forward_train_f32_##isa(bn_shape, const float *, bn_strides, float *, bn_strides,      \
                                   const double *, const double *, double, double *, double *);   \
    int bn_forward_train_f64_##isa(bn_shape, const double *, bn_strides, double *, bn_strides,    \
                                   const double *, const double *, double, double *, double *);   \
    int bn_forward_eval_f32_##isa(bn_shape, const float *, bn_strides, float *, bn_strides,       \
                                  const double *, const double *, const double *, const double *, \
                                  double);                                                        \
    int bn_forward_eval_f64_##isa(bn_shape, const double *, bn_strides, double *, bn_strides,     \
                                  const double *, const double *, const double *, const double *, \
                                  double);                                                        \
    int bn_backward_f32_##isa(bn_shape, const float *, bn_strides, const float *, bn_strides,     \
                              float *, bn_strides, const double *, const double *,                \
                              const double *, double, int, double *, double *);                   \
    int bn_backward_f64_##isa(bn_shape, const double *, bn_strides, const double *, bn_strides,   \
                              double *, bn_strides, const double *, const double *,               \
                              const double *, double, int, double *, double *);

#define BN_KERNELS_OF(isa)                                                                        \
    {                                                                                             \
#isa, bn_stats_f32_##isa, bn_stats_f64_##isa, bn_forward_train_f32_##isa,                 \
            bn_forward_train_f64_##isa, bn_forward_eval_f32_##isa, bn_forward_eval_f64_##isa,     \
            bn_backward_f32_##isa, bn_backward_f64_##isa                                          \
    }

typedef struct bn_kernels {
    const char *name;
    int (*stats_f32)(bn_shape, const float *, bn_strides, double *, double *);
    int (*stats_f64)(bn_shape, const double *, bn_strides, double *, double *);
    int (*forward_train_f32)(bn_shape, const float *, bn_strides, float *, bn_strides,
                             const double *, const double *, double, double *, double *);
    int (*forward_train_f64)(bn_shape, const double *, bn_strides, double *, bn_strides,
                             const double *, const double *, double, double *, double *);
    int (*forward_eval_f32)(bn_shape, const float *, bn_strides, float *, bn_strides,
                            const double *, const double *, const double *, const double *,
                            double);
    int (*forward_eval_f64)(bn_shape, const double *, bn_strides, double *, bn_strides,
                            const double *, const double *, const double *, const double *,
                            double);
    int (*backward_f32)(bn_shape, const float *, bn_strides, const float *, bn_strides, float *,
                        bn_strides, const double *, const double *, const double *, double, int,
                        double *, double *);
    int (*backward_f64)(bn_shape, const double *, bn_strides, const double *, bn_strides,
                        double *, bn_strides, const double *, const double *, const double *,
                        double, int, double *, double *);
} bn_kernels;

BN_DECLARE_ISA(baseline)
#ifdef BN_HAVE_AVX2
BN_DECLARE_ISA(avx2)
#endif
#ifdef BN_HAVE_AVX512
BN_DECLARE_ISA(avx512)
#endif

/* Best last. */
static const bn_kernels all_kernels[] = {
    BN_KERNELS_OF(baseline),
#ifdef BN_HAVE_AVX2
    BN_KERNELS_OF(avx2),
#endif
#ifdef BN_HAVE_AVX512
    BN_KERNELS_OF(avx512),
#endif
};
#define BN_N_KERNELS ((int)(sizeof(all_kernels) / sizeof(all_kernels[0])))

/* Does the CPU (and the OS, which must save the wide registers) support this kernel set? */
static int cpu_supports(const char *name)
{
    if (strcmp(name, "baseline") == 0) return 1;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

static const bn_kernels *find_kernels(const char *name)
{
    int i;
    for (i = 0; i < BN_N_KERNELS; ++i)
        if (name && strcmp(all_kernels[i].name, name) == 0 && cpu_supports(name))
            return &all_kernels[i];
    return NULL;
}

static const bn_kernels *active = NULL;

static const bn_kernels *kernels(void)
{
    if (!active) {
        const char *forced = getenv("BATCHNORM_ISA");
        const bn_kernels *k = forced && *forced ? find_kernels(forced) : NULL;
        int i;
        for (i = BN_N_KERNELS - 1; !k && i >= 0; --i)
            if (cpu_supports(all_kernels[i].name)) k = &all_kernels[i];
        active = k;
    }
    return active;
}

const char *bn_active_isa(void) { return kernels()->name; }

int bn_isa_available(const char *name) { return find_kernels(name) != NULL; }

int bn_set_isa(const char *name)
{
    const bn_kernels *k = find_kernels(name);
    if (!k) return BN_ERR_ISA;
    active = k;
    return BN_OK;
}

int bn_stats_f32(bn_shape s, const float *x, bn_strides xs, double *mean, double *var)
{
    return kernels()->stats_f32(s, x, xs, mean, var);
}

int bn_stats_f64(bn_shape s, const double *x, bn_strides xs, double *mean, double *var)
{
    return kernels()->stats_f64(s, x, xs, mean, var);
}

int bn_forward_train_f32(bn_shape s, const float *x, bn_strides xs, float *y, bn_strides ys,
                         const double *gamma, const double *beta, double eps, double *mean,
                         double *var)
{
    return kernels()->forward_train_f32(s, x, xs, y, ys, gamma, beta, eps, mean, var);
}

int bn_forward_train_f64(bn_shape s, const double *x, bn_strides xs, double *y, bn_strides ys,
                         const double *gamma, const double *beta, double eps, double *mean,
                         double *var)
{
    return kernels()->forward_train_f64(s, x, xs, y, ys, gamma, beta, eps, mean, var);
}

int bn_forward_eval_f32(bn_shape s, const float *x, bn_strides xs, float *y, bn_strides ys,
                        const double *mean, const double *var, const double *gamma,
                        const double *beta, double eps)
{
    return kernels()->forward_eval_f32(s, x, xs, y, ys, mean, var, gamma, beta, eps);
}

int bn_forward_eval_f64(bn_shape s, const double *x, bn_strides xs, double *y, bn_strides ys,
                        const double *mean, const double *var, const double *gamma,
                        const double *beta, double eps)
{
    return kernels()->forward_eval_f64(s, x, xs, y, ys, mean, var, gamma, beta, eps);
}

int bn_backward_f32(bn_shape s, const float *dy, bn_strides dys, const float *x, bn_strides xs,
                    float *dx, bn_strides dxs, const double *mean, const double *var,
                    const double *gamma, double eps, int training, double *dgamma,
                    double *dbeta)
{
    return kernels()->backward_f32(s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, training,
                                   dgamma, dbeta);
}

int bn_backward_f64(bn_shape s, const double *dy, bn_strides dys, const double *x,
                    bn_strides xs, double *dx, bn_strides dxs, const double *mean,
                    const double *var, const double *gamma, double eps, int training,
                    double *dgamma, double *dbeta)
{
    return kernels()->backward_f64(s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, training,
                                   dgamma, dbeta);
}
