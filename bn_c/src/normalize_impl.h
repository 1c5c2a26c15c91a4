/* Training and inference forward for element type BN_T. Included once per type by
 * normalize.c. */
#include "units_impl.h"

/* The inference pass over the units of tiling t, on the team of BN_ON_THREADS (internal.h). */
static void FN(eval_units)(int team, const bn_tiling *t, bn_shape s, const BN_T *x,
                           bn_strides xs, BN_T *y, bn_strides ys, const BN_CT *coef,
                           ptrdiff_t CS, const bn_call *ex)
{
    ptrdiff_t u;
    BN_FOR_DYNAMIC(team, u, t->units,
                   FN(affine_unit)(t, s, x, xs, y, ys, u, coef, coef + CS, coef + 2 * CS, ex));
}

int BN_EXPORT(bn_forward_eval, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, BN_T *y,
                                      bn_strides ys, const double *mean, const double *var,
                                      const double *gamma, const double *beta, double eps,
                                      const bn_options *opt)
{
    BN_CT *coef;
    bn_call ex;
    bn_tiling t;
    ptrdiff_t C = s.channels, CS = BN_COEF_STRIDE(C);
    int nt, wide;
    if (!bn_shape_ok(s) || (C > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (C == 0 || s.outer == 0 || s.inner == 0) return BN_OK;
    if (!x || !y) return BN_ERR_ARG;
    coef = FN(alloc_coefs)(3, C, y);
    if (!coef) return BN_ERR_NOMEM;
    wide = FN(affine_coefficients)(0, C, mean, var, gamma, beta, eps, 0.0, coef, coef + CS,
                                   coef + 2 * CS);
    FN(wrap_channels)(coef, 3, C, 0, C);
    ex = FN(call_of)(s, mean, var, gamma, beta, eps, &wide, opt);
    t = bn_make_pass_tiling(s, 0, C);
    nt = bn_threads_for(s.outer * C * s.inner, 1, t.units);
    BN_ON_THREADS(nt, FN(eval_units), &t, s, x, xs, y, ys, coef, CS, &ex);
    FN(free_coefs)(coef, C);
    return BN_OK;
}

/* The chunk loop of the training forward, on the team of BN_ON_THREADS (internal.h). */
static void FN(train_chunks)(int team, bn_shape s, const BN_T *x, bn_strides xs, BN_T *y,
                             bn_strides ys, const double *gamma, const double *beta, double eps,
                             double *mean, double *var, const bn_options *opt,
                             const bn_mask *mk, ptrdiff_t cc, ptrdiff_t size, double *scratch,
                             BN_CT *coef, int *wide)
{
    ptrdiff_t c0, u, b, C = s.channels, CS = BN_COEF_STRIDE(C);
    double *pcount = mk->m ? scratch + 2 * size : NULL;
    double n = mk->m ? -mk->count : (double)(s.outer * s.inner); /* see lossy_spread */
    /* wide is shared: counted by the threads that compute the coefficients */
    bn_call ex = FN(call_of)(s, mean, var, gamma, beta, eps, wide, opt);
    for (c0 = 0; c0 < C; c0 += cc) {
        bn_tiling t = bn_make_tiling(s, c0, c0 + cc <= C ? cc : C - c0);
        bn_tiling tp = bn_make_pass_tiling(s, c0, t.c_count);
        ptrdiff_t width = BN_MERGE_WIDTH(team), blocks = bn_ceil_div(t.c_count, width);
        BN_FOR_DYNAMIC(team, u, t.units, {
            if (pcount)
                FN(masked_stats_unit)(&t, s, x, xs, mk, u, scratch, scratch + size, pcount);
            else
                FN(stats_unit)(&t, s, x, xs, u, scratch, scratch + size);
        });
        /* merge and coefficients, block by block of channels on all threads */
        BN_FOR_STATIC(team, b, blocks, {
            ptrdiff_t lo = b * width, nc = bn_min(width, t.c_count - lo);
            int w;
            bn_merge_moments(&t, s, scratch, scratch + size, pcount, mean + c0, var + c0, lo, nc);
            FN(add_references)(&t, x, xs, mk, mean + c0, lo, nc);
            w = FN(affine_coefficients)(c0 + lo, nc, mean, var, gamma, beta, eps, n, coef,
                                        coef + CS, coef + 2 * CS);
            if (t.c_count == C) FN(wrap_channels)(coef, 3, C, lo, nc);
            /* a count over all chunks so far: units then test each channel */
            if (w) BN_ATOMIC_ADD(team, *wide, w);
        });
        BN_FOR_DYNAMIC(team, u, tp.units,
                       FN(affine_unit)(&tp, s, x, xs, y, ys, u, coef, coef + CS, coef + 2 * CS,
                                       &ex));
    }
}

/* Statistics and normalization, chunk by chunk of channels: a chunk's x is read from memory
 * by the statistics pass and again from cache by the normalize pass, so a large tensor costs
 * about one read and one write. */
int BN_EXPORT(bn_forward_train, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, BN_T *y,
                                       bn_strides ys, const double *gamma, const double *beta,
                                       double eps, double *mean, double *var,
                                       const bn_options *opt)
{
    bn_mask mk;
    bn_tiling t0;
    ptrdiff_t C = s.channels, cc, size, k;
    double *scratch;
    BN_CT *coef;
    int nt, wide = 0;
    if (!bn_shape_ok(s) || (C > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (C == 0) return BN_OK;
    if (s.outer == 0 || s.inner == 0) {
        for (k = 0; k < C; ++k) mean[k] = var[k] = NAN;
        return BN_OK;
    }
    if (!x || !y || bn_mask_of(opt, s, &mk) < 0) return BN_ERR_ARG;
    cc = bn_chunk_channels(s, 1, sizeof(BN_CT)); /* x stays cached between the passes */
    /* partials of the largest chunk; every chunk has as many parts */
    t0 = bn_make_tiling(s, 0, cc);
    size = t0.parts * BN_PART_STRIDE(cc);
    /* partial means and M2, then (masked) the parts' counts */
    scratch = (double *)bn_alloc_aligned(sizeof(double) * (2 * (size_t)size + (size_t)t0.parts));
    coef = FN(alloc_coefs)(3, C, y);
    if (!scratch || !coef) {
        bn_free_aligned(scratch), FN(free_coefs)(coef, C);
        return BN_ERR_NOMEM;
    }
    if (mk.m) bn_part_mask_counts(&t0, s, &mk, scratch + 2 * size);
    nt = bn_threads_for(s.outer * C * s.inner, 2, t0.units);
    BN_ON_THREADS(nt, FN(train_chunks), s, x, xs, y, ys, gamma, beta, eps, mean, var, opt, &mk,
                  cc, size, scratch, coef, &wide);
    bn_free_aligned(scratch), FN(free_coefs)(coef, C);
    return BN_OK;
}

#undef FN
