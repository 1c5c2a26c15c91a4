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
    /* in local arrays first: loops that write only them vectorise (written straight to the
     * outputs, which might alias the inputs as far as the compiler knows, they did not, and
     * on a (64, 128) backward this loop took 17% of the call) */
    double inv[BN_MERGE_BLOCK_MAX], a[BN_MERGE_BLOCK_MAX], g[BN_MERGE_BLOCK_MAX];
    double b[BN_MERGE_BLOCK_MAX], ct[BN_MERGE_BLOCK_MAX];
    BN_CT m[BN_MERGE_BLOCK_MAX], ka[BN_MERGE_BLOCK_MAX], kb[BN_MERGE_BLOCK_MAX];
    BN_CT kc[BN_MERGE_BLOCK_MAX];
    int lossy[BN_MERGE_BLOCK_MAX];
    ptrdiff_t j;
    int wide = 0;
    const double *v = var + c0, *mu = mean + c0;
    for (j = 0; j < cc; ++j) {
        inv[j] = 1.0 / sqrt(v[j] + eps);
        a[j] = (gamma ? gamma[c0 + j] : 1.0) * inv[j];
        g[j] = given ? sdyx[j] : bn_dgamma(sdyx[j], inv[j]); /* sum of dy*xhat */
        m[j] = (BN_CT)mu[j];
        lossy[j] = FN(lossy)(a[j]);
    }
    if (training)
        for (j = 0; j < cc; ++j) {
            /* dx = a*dy + b*(x - mean) + c, with the rounding of the mean folded into c; b
             * is formed as (a * inv) * (g / n), whose factors stay in range where
             * a * inv * inv * sdyx alone would underflow (a float64 spread over 1e120) */
            double c = -a[j] * sdy[j] / n;
            b[j] = -(a[j] * inv[j]) * (g[j] / n);
            ct[j] = c + b[j] * ((double)m[j] - mu[j]);
            lossy[j] |= FN(lossy)(b[j]) | FN(lossy)(ct[j]) |
                        FN(lossy_spread)(n, v[j], (double)m[j]);
        }
    /* the coefficients in the compute type, counted and then copied out, in loops over
     * local arrays only (stores to the outputs, which the compiler cannot tell apart from
     * the inputs, kept the loops that wrote them scalar) */
    for (j = 0; j < cc; ++j) /* NaN: what FN(wide) counts */
        ka[j] = lossy[j] ? (BN_CT)NAN : (BN_CT)a[j];
    if (training)
        for (j = 0; j < cc; ++j) kb[j] = (BN_CT)b[j], kc[j] = (BN_CT)ct[j];
    for (j = 0; j < cc; ++j)
        wide += FN(wide)(m, ka, training ? kb : NULL, training ? kc : NULL, j);
    if (training) {
        memcpy(coef + 2 * CS + c0, kb, sizeof(BN_CT) * (size_t)cc);
        memcpy(coef + 3 * CS + c0, kc, sizeof(BN_CT) * (size_t)cc);
    }
    memcpy(coef + c0, m, sizeof(BN_CT) * (size_t)cc);
    memcpy(coef + CS + c0, ka, sizeof(BN_CT) * (size_t)cc);
    memcpy(sdyx, g, sizeof(double) * (size_t)cc); /* the exact path reads the sums of dy*xhat */
    if (dbeta) memcpy(dbeta + c0, sdy, sizeof(double) * (size_t)cc);
    if (dgamma) memcpy(dgamma + c0, g, sizeof(double) * (size_t)cc);
    return wide;
}

/* The chunk loop of the backward pass, on the team of BN_ON_THREADS (internal.h). With
 * `total`, the training gradient takes its sums and count instead of x's. */
static void FN(backward_chunks)(int team, bn_shape s, const BN_T *dy, bn_strides dys,
                                const BN_T *x, bn_strides xs, BN_T *dx, bn_strides dxs,
                                const double *mean, const double *var, const double *gamma,
                                double eps, int training, const bn_batch_total *total,
                                double *dgamma, double *dbeta, const bn_options *opt,
                                const bn_mask *mk, ptrdiff_t cc, ptrdiff_t size, double *sums,
                                BN_CT *coef, int *wide)
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
        ptrdiff_t width = BN_MERGE_WIDTH(team), blocks = bn_ceil_div(t.c_count, width);
        ex.c_begin = c0;
        if (gate)
            BN_FOR_DYNAMIC(team, u, tp.units,
                           FN(gate_unit)(&tp, s, dy, dys, (const BN_T *)opt->y, opt->y_strides,
                                         (BN_T *)opt->dz, opt->dz_strides, u));
        if (need_sums)
            BN_FOR_DYNAMIC(team, u, t.units,
                           FN(bwd_sums_unit)(&t, s, g, gs, x, xs, mean, u, psdy, psdyx));
        /* sums and coefficients, block by block of channels on all threads */
        BN_FOR_STATIC(team, bl, blocks, {
            ptrdiff_t lo = bl * width, nc = bn_min(width, t.c_count - lo);
            int w;
            if (need_sums)
                bn_merge_sums(&t, psdy, sdy, lo, nc), bn_merge_sums(&t, psdyx, sdyx, lo, nc);
            if (total) {
                memcpy(sdy + lo, total->sum_dy + c0 + lo, sizeof(double) * (size_t)nc);
                memcpy(sdyx + lo, total->sum_dy_xhat + c0 + lo, sizeof(double) * (size_t)nc);
            }
            w = FN(bwd_coefficients)(c0 + lo, nc, CS, n, mean, var, gamma, eps, training,
                                     total != NULL, sdy + lo, sdyx + lo, coef, dgamma, dbeta);
            if (t.c_count == C) FN(wrap_channels)(coef, training ? 4 : 2, C, lo, nc);
            /* a count over all chunks so far: units then test each channel */
            if (w) BN_ATOMIC_ADD(team, *wide, w);
        });
        if (dx)
            BN_FOR_DYNAMIC(team, u, tp.units,
                           FN(bwd_dx_unit)(&tp, s, g, gs, x, xs, dx, dxs, u, coef, coef + CS, b,
                                           c, &ex, masked ? mk : NULL));
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
    coef = FN(alloc_coefs)(4, C, dx);
    if (!sums || !coef) {
        bn_free_aligned(sums), FN(free_coefs)(coef, C);
        return BN_ERR_NOMEM;
    }
    nt = bn_threads_for(s.outer * C * s.inner,
                        (need_sums ? 2 + training : 1) + (opt && opt->activation == BN_ACT_RELU),
                        t0.units);
    BN_ON_THREADS(nt, FN(backward_chunks), s, dy, dys, x, xs, dx, dxs, mean, var, gamma, eps,
                  training, total, dgamma, dbeta, opt, &mk, cc, size, sums, coef, &wide);
    bn_free_aligned(sums), FN(free_coefs)(coef, C);
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
