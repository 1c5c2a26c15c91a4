/* Gradients for element type BN_T. Included once per type by backward.c. */
#include "runs_impl.h"

/* Partial sums of dy and dy * (x - mean) of one unit. Traffic: read dy and x. */
static void FN(bwd_unit_sums)(const bn_tiling *t, bn_shape s, const BN_T *dy, bn_strides dys,
                              const BN_T *x, bn_strides xs, const double *mean, ptrdiff_t u,
                              double *psdy, double *psdyx)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t o, j;
    if (t->planar) {
        double sdy = 0.0, sdyx = 0.0;
        for (o = w.o0; o < w.o0 + w.rows; ++o)
            FN(run_bwd_sums)(BN_AT(dy, dys, o, w.c0, w.i0), dys.inner, BN_AT(x, xs, o, w.c0, w.i0),
                             xs.inner, w.len, mean[w.c0], &sdy, &sdyx);
        psdy[w.c0 * t->parts + w.k] = sdy;
        psdyx[w.c0 * t->parts + w.k] = sdyx;
    } else {
        double sdy[BN_MAX_CHANNEL_BLOCK], sdyx[BN_MAX_CHANNEL_BLOCK];
        for (j = 0; j < w.cn; ++j) sdy[j] = sdyx[j] = 0.0;
        for (o = w.o0; o < w.o0 + w.rows; ++o)
            FN(cols_bwd_sums)(BN_AT(dy, dys, o, w.c0, 0), dys.channel, BN_AT(x, xs, o, w.c0, 0),
                              xs.channel, w.cn, mean + w.c0, sdy, sdyx);
        for (j = 0; j < w.cn; ++j) {
            psdy[(w.c0 + j) * t->parts + w.k] = sdy[j];
            psdyx[(w.c0 + j) * t->parts + w.k] = sdyx[j];
        }
    }
}

/* dx over one unit: a*dy + b*(x-m) + c (training) or a*dy (frozen, b == NULL).
 * Traffic: read dy (and x), write dx. */
static void FN(bwd_unit_dx)(const bn_tiling *t, bn_shape s, const BN_T *dy, bn_strides dys,
                            const BN_T *x, bn_strides xs, BN_T *dx, bn_strides dxs, ptrdiff_t u,
                            const BN_T *m, const BN_T *a, const BN_T *b, const BN_T *c)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t o, k = w.c0;
    for (o = w.o0; o < w.o0 + w.rows; ++o) {
        const BN_T *g = BN_AT(dy, dys, o, k, w.i0);
        BN_T *d = BN_AT(dx, dxs, o, k, w.i0);
        if (t->planar && b)
            FN(run_bwd_dx)(g, dys.inner, BN_AT(x, xs, o, k, w.i0), xs.inner, d, dxs.inner, w.len,
                           m[k], a[k], b[k], c[k]);
        else if (t->planar)
            FN(run_scale)(g, dys.inner, d, dxs.inner, w.len, a[k]);
        else if (b)
            FN(cols_bwd_dx)(g, dys.channel, BN_AT(x, xs, o, k, 0), xs.channel, d, dxs.channel,
                            w.cn, m + k, a + k, b + k, c + k);
        else
            FN(cols_scale)(g, dys.channel, d, dxs.channel, w.cn, a + k);
    }
}

int BN_EXPORT(bn_backward, BN_TN)(bn_shape s, const BN_T *dy, bn_strides dys, const BN_T *x,
                                  bn_strides xs, BN_T *dx, bn_strides dxs, const double *mean,
                                  const double *var, const double *gamma, double eps,
                                  int training, double *dgamma, double *dbeta)
{
    bn_tiling t;
    double *sums, *psdy, *psdyx, *sdy, *sdyx;
    BN_T *coef;
    ptrdiff_t u, k, C = s.channels;
    int nt, need_sums = training || dgamma || dbeta;
    double n = (double)(s.outer * s.inner);
    if (!bn_shape_ok(s) || (C > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (C == 0) return BN_OK;
    if (s.outer == 0 || s.inner == 0) {
        for (k = 0; k < C; ++k) {
            if (dgamma) dgamma[k] = 0.0;
            if (dbeta) dbeta[k] = 0.0;
        }
        return BN_OK;
    }
    if (!dy || (need_sums && !x)) return BN_ERR_ARG;
    t = bn_make_tiling(s);
    nt = bn_threads_for(s.outer * C * s.inner, t.units);
    (void)nt;
    sums = (double *)malloc(sizeof(double) * 2 * (size_t)(C * t.parts + C));
    coef = (BN_T *)malloc(sizeof(BN_T) * 4 * (size_t)C);
    if (!sums || !coef) {
        free(sums), free(coef);
        return BN_ERR_NOMEM;
    }
    psdy = sums, psdyx = sums + C * t.parts, sdy = psdyx + C * t.parts, sdyx = sdy + C;

    if (need_sums) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
        for (u = 0; u < t.units; ++u)
            FN(bwd_unit_sums)(&t, s, dy, dys, x, xs, mean, u, psdy, psdyx);
        bn_merge_sums(&t, s, psdy, sdy);
        bn_merge_sums(&t, s, psdyx, sdyx);
    }
    for (k = 0; k < C; ++k) {
        double inv = 1.0 / sqrt(var[k] + eps), g = gamma ? gamma[k] : 1.0, a = g * inv;
        if (dbeta) dbeta[k] = sdy[k];
        if (dgamma) dgamma[k] = sdyx[k] * inv;
        coef[k] = (BN_T)mean[k];
        coef[C + k] = (BN_T)a;
        if (training) {
            /* dx = a*dy + b*(x - mean) + c, with the rounding of the mean folded into c */
            double b = -a * inv * inv * sdyx[k] / n, c = -a * sdy[k] / n;
            coef[2 * C + k] = (BN_T)b;
            coef[3 * C + k] = (BN_T)(c + b * ((double)coef[k] - mean[k]));
        }
    }
    if (dx) {
        const BN_T *b = training ? coef + 2 * C : NULL;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
        for (u = 0; u < t.units; ++u)
            FN(bwd_unit_dx)(&t, s, dy, dys, x, xs, dx, dxs, u, coef, coef + C, b, coef + 3 * C);
    }
    free(sums), free(coef);
    return BN_OK;
}

#undef FN
