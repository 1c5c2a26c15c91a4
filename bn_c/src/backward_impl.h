/* Gradients for element type BN_T. Included once per type by backward.c. */
#include "units_impl.h"

/* Coefficients of dx = a*dy + b*(x - m) + c for channels [c0, c0 + cc), in arrays CS apart,
 * and the parameter gradients, from the per-channel sums of dy and of dy*(x - mean) (or,
 * when `given`, of dy*xhat: the sums of a whole batch handed in). sdyx is left holding the
 * sums of dy*xhat, which the exact path reads. Returns how many channels take the exact path. */
static int FN(bwd_coefficients)(ptrdiff_t c0, ptrdiff_t cc, ptrdiff_t CS, double n,
                                 const double *mean, const double *var, const double *gamma,
                                 double eps, int training, int given, const double *sdy,
                                 double *sdyx, BN_CT *coef, double *dgamma, double *dbeta)
{
    ptrdiff_t k;
    int wide = 0;
    for (k = c0; k < c0 + cc; ++k) {
        double inv = 1.0 / sqrt(var[k] + eps), a = (gamma ? gamma[k] : 1.0) * inv;
        double g = given ? sdyx[k - c0] : bn_dgamma(sdyx[k - c0], inv); /* sum of dy*xhat */
        int lossy = FN(lossy)(a);
        sdyx[k - c0] = g;
        if (dbeta) dbeta[k] = sdy[k - c0];
        if (dgamma) dgamma[k] = g;
        coef[k] = (BN_CT)mean[k];
        if (training) {
            /* dx = a*dy + b*(x - mean) + c, with the rounding of the mean folded into c; b
             * is formed as (a * inv) * (g / n), whose factors stay in range where
             * a * inv * inv * sdyx alone would underflow (a float64 spread over 1e120) */
            double b = -(a * inv) * (g / n), c = -a * sdy[k - c0] / n;
            double c_total = c + b * ((double)coef[k] - mean[k]);
            coef[2 * CS + k] = (BN_CT)b;
            coef[3 * CS + k] = (BN_CT)c_total;
            lossy |= FN(lossy)(b) | FN(lossy)(c_total) |
                     FN(lossy_spread)(n, var[k], (double)coef[k]);
        }
        coef[CS + k] = lossy ? (BN_CT)NAN : (BN_CT)a; /* NaN: the marker FN(wide) counts */
        wide += FN(wide)(coef, coef + CS, training ? coef + 2 * CS : NULL,
                         training ? coef + 3 * CS : NULL, k);
    }
    return wide;
}

/* The chunk loop of the backward pass (worksharing binds to the caller's team, as in
 * train_chunks). With `total`, the training gradient takes its sums and count instead of x's. */
static void FN(backward_chunks)(bn_shape s, const BN_T *dy, bn_strides dys, const BN_T *x,
                                bn_strides xs, BN_T *dx, bn_strides dxs, const double *mean,
                                const double *var, const double *gamma, double eps,
                                int training, const bn_batch_total *total, double *dgamma,
                                double *dbeta, const bn_options *opt, const bn_mask *mk,
                                ptrdiff_t cc, ptrdiff_t size, double *sums, BN_CT *coef,
                                int *wide)
{
    ptrdiff_t C = s.channels, CS = BN_COEF_STRIDE(C), c0, u, bl;
    int need_sums = !total && (training || dgamma || dbeta);
    int gate = opt && opt->activation == BN_ACT_RELU, masked = training && mk->m;
    double n = total ? total->n : mk->m ? mk->count : (double)(s.outer * s.inner);
    /* with the relu's gate, batch norm's upstream gradient is dz */
    const BN_T *g = gate ? (const BN_T *)opt->dz : dy;
    bn_strides gs = gate ? opt->dz_strides : dys;
    double *psdy = sums, *psdyx = sums + size, *sdy = psdyx + size, *sdyx = sdy + cc;
    const BN_CT *b = training ? coef + 2 * CS : NULL, *c = training ? coef + 3 * CS : NULL;
    /* wide is shared: counted by the threads that compute the coefficients */
    bn_call ex = FN(call_of)(s, mean, var, gamma, NULL, eps, wide, NULL);
    ex.sdy = training ? sdy : NULL, ex.sdyxhat = sdyx, ex.n = n;
    for (c0 = 0; c0 < C; c0 += cc) {
        bn_tiling t = bn_make_tiling(s, c0, c0 + cc <= C ? cc : C - c0);
        bn_tiling tp = bn_make_pass_tiling(s, c0, t.c_count);
        ptrdiff_t blocks = bn_merge_blocks(&t);
        ex.c_begin = c0;
        if (gate) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
            for (u = 0; u < tp.units; ++u)
                FN(gate_unit)(&tp, s, dy, dys, (const BN_T *)opt->y, opt->y_strides,
                              (BN_T *)opt->dz, opt->dz_strides, u);
        }
        if (need_sums) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
            for (u = 0; u < t.units; ++u)
                FN(bwd_sums_unit)(&t, s, g, gs, x, xs, mean, u, psdy, psdyx);
        }
        /* sums and coefficients, block by block of channels on all threads */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (bl = 0; bl < blocks; ++bl) {
            ptrdiff_t lo = bl * BN_MERGE_BLOCK, nc = bn_min(BN_MERGE_BLOCK, t.c_count - lo);
            int w;
            if (need_sums) bn_merge_sums(&t, psdy, sdy, bl), bn_merge_sums(&t, psdyx, sdyx, bl);
            if (total) {
                memcpy(sdy + lo, total->sum_dy + c0 + lo, sizeof(double) * (size_t)nc);
                memcpy(sdyx + lo, total->sum_dy_xhat + c0 + lo, sizeof(double) * (size_t)nc);
            }
            w = FN(bwd_coefficients)(c0 + lo, nc, CS, n, mean, var, gamma, eps, training,
                                     total != NULL, sdy + lo, sdyx + lo, coef, dgamma, dbeta);
            if (t.c_count == C) FN(wrap_channels)(coef, training ? 4 : 2, C, lo, nc);
            if (w) {
#ifdef _OPENMP
#pragma omp atomic
#endif
                *wide += w; /* a count over all chunks so far: units then test each channel */
            }
        }
        if (dx) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
            for (u = 0; u < tp.units; ++u) {
                if (masked)
                    FN(masked_dx_unit)(&tp, s, g, gs, x, xs, dx, dxs, u, coef, coef + CS, b, c,
                                       &ex, mk);
                else
                    FN(bwd_dx_unit)(&tp, s, g, gs, x, xs, dx, dxs, u, coef, coef + CS, b, c,
                                    &ex);
            }
        }
    }
}

/* Sums then dx, chunk by chunk of channels, so that x and dy are read from memory once for
 * the sums and again from cache for dx (with `total`: read once, for dx). */
static int FN(backward_run)(bn_shape s, const BN_T *dy, bn_strides dys, const BN_T *x,
                            bn_strides xs, BN_T *dx, bn_strides dxs, const double *mean,
                            const double *var, const double *gamma, double eps, int training,
                            const bn_batch_total *total, double *dgamma, double *dbeta,
                            const bn_options *opt)
{
    bn_mask mk;
    double *sums;
    BN_CT *coef;
    bn_tiling t0;
    ptrdiff_t k, C = s.channels, cc, size;
    int nt, wide = 0, need_sums = !total && (training || dgamma || dbeta);
    int arrays = need_sums ? 2 : 1;
    if (!bn_shape_ok(s) || (C > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (total && (!total->sum_dy || !total->sum_dy_xhat || !(total->n >= 1.0))) return BN_ERR_ARG;
    if (C == 0) return BN_OK;
    if (s.outer == 0 || s.inner == 0) {
        for (k = 0; k < C; ++k) {
            if (dgamma) dgamma[k] = 0.0;
            if (dbeta) dbeta[k] = 0.0;
        }
        return BN_OK;
    }
    if (!dy || ((need_sums || (total && dx)) && !x) || bn_mask_of(opt, s, &mk) < 0) return BN_ERR_ARG;
    if (opt && opt->activation == BN_ACT_RELU && (!opt->y || !opt->dz)) return BN_ERR_ARG;
    if (opt && opt->activation == BN_ACT_RELU) ++arrays; /* y, then dz, stay in cache */
    cc = bn_chunk_channels(s, arrays, sizeof(BN_CT));
    /* partials of the largest chunk (every chunk has as many parts), then the chunk's sums */
    t0 = bn_make_tiling(s, 0, cc);
    size = t0.parts * BN_PART_STRIDE(cc);
    sums = (double *)bn_alloc_aligned(sizeof(double) * 2 * (size_t)(size + cc));
    coef = (BN_CT *)malloc(sizeof(BN_CT) * 4 * (size_t)BN_COEF_STRIDE(C));
    if (!sums || !coef) {
        bn_free_aligned(sums), free(coef);
        return BN_ERR_NOMEM;
    }
    nt = bn_threads_for(s.outer * C * s.inner,
                        (need_sums ? 2 + training : 1) + (opt && opt->activation == BN_ACT_RELU),
                        t0.units);
    if (nt > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
        FN(backward_chunks)(s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, training, total,
                            dgamma, dbeta, opt, &mk, cc, size, sums, coef, &wide);
    } else {
        FN(backward_chunks)(s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, training, total,
                            dgamma, dbeta, opt, &mk, cc, size, sums, coef, &wide);
    }
    bn_free_aligned(sums), free(coef);
    return BN_OK;
}

int BN_EXPORT(bn_backward, BN_TN)(bn_shape s, const BN_T *dy, bn_strides dys, const BN_T *x,
                                  bn_strides xs, BN_T *dx, bn_strides dxs, const double *mean,
                                  const double *var, const double *gamma, double eps,
                                  int training, double *dgamma, double *dbeta,
                                  const bn_options *opt)
{
    return FN(backward_run)(s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, training, NULL,
                            dgamma, dbeta, opt);
}

int BN_EXPORT(bn_backward_total, BN_TN)(bn_shape s, const BN_T *dy, bn_strides dys,
                                        const BN_T *x, bn_strides xs, BN_T *dx, bn_strides dxs,
                                        const double *mean, const double *var,
                                        const double *gamma, double eps, double n,
                                        const double *sum_dy, const double *sum_dy_xhat)
{
    bn_batch_total total;
    total.n = n, total.sum_dy = sum_dy, total.sum_dy_xhat = sum_dy_xhat;
    if (!dx) return BN_ERR_ARG;
    return FN(backward_run)(s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps, 1, &total, NULL,
                            NULL, NULL);
}

#undef FN
