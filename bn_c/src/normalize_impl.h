/* Normalization (training and inference forward) for element type BN_T.
 * Included once per type by normalize.c. */
#include "runs_impl.h"

int BN_EXPORT(bn_stats, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, double *mean,
                               double *var);

/* Per-channel coefficients of y = (x - m) * a + b in the storage type. m is the mean rounded
 * to BN_T; the rounding is folded into b (in double), so x - m is exact for x near the mean
 * and the output keeps full precision even when the mean is large next to the spread. */
static void FN(affine_coefficients)(ptrdiff_t C, const double *mean, const double *var,
                                    const double *gamma, const double *beta, double eps,
                                    BN_T *m, BN_T *a, BN_T *b)
{
    ptrdiff_t c;
    for (c = 0; c < C; ++c) {
        double scale = (gamma ? gamma[c] : 1.0) / sqrt(var[c] + eps);
        m[c] = (BN_T)mean[c];
        a[c] = (BN_T)scale;
        b[c] = (BN_T)((beta ? beta[c] : 0.0) + ((double)m[c] - mean[c]) * scale);
    }
}

/* y = (x - m) * a + b over the whole view. Traffic: read x, write y. */
static void FN(affine_apply)(bn_shape s, const BN_T *x, bn_strides xs, BN_T *y, bn_strides ys,
                             const BN_T *m, const BN_T *a, const BN_T *b)
{
    bn_tiling t = bn_make_tiling(s);
    int nt = bn_threads_for(s.outer * s.channels * s.inner, t.units);
    ptrdiff_t u;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (u = 0; u < t.units; ++u) {
        bn_unit w = bn_unit_at(&t, s, u);
        ptrdiff_t o, c = w.c0;
        if (t.planar) {
            for (o = w.o0; o < w.o0 + w.rows; ++o)
                FN(run_affine)(BN_AT(x, xs, o, c, w.i0), xs.inner, BN_AT(y, ys, o, c, w.i0),
                               ys.inner, w.len, m[c], a[c], b[c]);
        } else {
            for (o = w.o0; o < w.o0 + w.rows; ++o)
                FN(cols_affine)(BN_AT(x, xs, o, c, 0), xs.channel, BN_AT(y, ys, o, c, 0),
                                ys.channel, w.cn, m + c, a + c, b + c);
        }
    }
}

int BN_EXPORT(bn_forward_eval, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, BN_T *y,
                                      bn_strides ys, const double *mean, const double *var,
                                      const double *gamma, const double *beta, double eps)
{
    BN_T *coef;
    if (!bn_shape_ok(s) || (s.channels > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (s.channels == 0 || s.outer == 0 || s.inner == 0) return BN_OK;
    if (!x || !y) return BN_ERR_ARG;
    coef = (BN_T *)malloc(sizeof(BN_T) * 3 * (size_t)s.channels);
    if (!coef) return BN_ERR_NOMEM;
    FN(affine_coefficients)(s.channels, mean, var, gamma, beta, eps, coef, coef + s.channels,
                            coef + 2 * s.channels);
    FN(affine_apply)(s, x, xs, y, ys, coef, coef + s.channels, coef + 2 * s.channels);
    free(coef);
    return BN_OK;
}

int BN_EXPORT(bn_forward_train, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, BN_T *y,
                                       bn_strides ys, const double *gamma, const double *beta,
                                       double eps, double *mean, double *var)
{
    int rc = BN_EXPORT(bn_stats, BN_TN)(s, x, xs, mean, var);
    if (rc != BN_OK) return rc;
    return BN_EXPORT(bn_forward_eval, BN_TN)(s, x, xs, y, ys, mean, var, gamma, beta, eps);
}

#undef FN
