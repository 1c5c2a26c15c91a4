/* Batch statistics for element type BN_T. Included once per type by stats.c. */
#include "runs_impl.h"

/* Partial mean and M2 (sum of squared deviations) of one unit: two passes over the unit,
 * which is still in cache for the second; the mean is refined by the mean deviation so that
 * a constant channel gets its value back exactly. Traffic: one read of x from memory. */
static void FN(stats_unit)(const bn_tiling *t, bn_shape s, const BN_T *x, bn_strides xs,
                           ptrdiff_t u, double *pmean, double *pm2)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t o, j;
    if (t->planar) {
        const BN_T *base = BN_AT(x, xs, w.o0, w.c0, w.i0);
        double n = (double)(w.rows * w.len), sum = 0.0, sd = 0.0, sdd = 0.0, m1;
        for (o = 0; o < w.rows; ++o) sum += FN(run_sum)(base + o * xs.outer, w.len, xs.inner);
        m1 = sum / n;
        for (o = 0; o < w.rows; ++o) FN(run_dev)(base + o * xs.outer, w.len, xs.inner, m1, &sd, &sdd);
        pmean[w.c0 * t->parts + w.k] = m1 + sd / n;
        pm2[w.c0 * t->parts + w.k] = sdd - sd * (sd / n);
    } else {
        double acc[BN_MAX_CHANNEL_BLOCK], sd[BN_MAX_CHANNEL_BLOCK], sdd[BN_MAX_CHANNEL_BLOCK];
        const BN_T *base = BN_AT(x, xs, w.o0, w.c0, 0);
        double n = (double)w.rows;
        for (j = 0; j < w.cn; ++j) acc[j] = sd[j] = sdd[j] = 0.0;
        for (o = 0; o < w.rows; ++o) FN(cols_sum)(base + o * xs.outer, xs.channel, w.cn, acc);
        for (j = 0; j < w.cn; ++j) acc[j] /= n;
        for (o = 0; o < w.rows; ++o) FN(cols_dev)(base + o * xs.outer, xs.channel, w.cn, acc, sd, sdd);
        for (j = 0; j < w.cn; ++j) {
            pmean[(w.c0 + j) * t->parts + w.k] = acc[j] + sd[j] / n;
            pm2[(w.c0 + j) * t->parts + w.k] = sdd[j] - sd[j] * (sd[j] / n);
        }
    }
}

int BN_EXPORT(bn_stats, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, double *mean,
                               double *var)
{
    bn_tiling t;
    double *scratch;
    ptrdiff_t u, c;
    int nt;
    if (!bn_shape_ok(s) || (s.channels > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (s.channels == 0) return BN_OK;
    if (s.outer == 0 || s.inner == 0) {
        for (c = 0; c < s.channels; ++c) mean[c] = var[c] = NAN;
        return BN_OK;
    }
    if (!x) return BN_ERR_ARG;
    t = bn_make_tiling(s);
    scratch = (double *)malloc(sizeof(double) * 2 * (size_t)(s.channels * t.parts));
    if (!scratch) return BN_ERR_NOMEM;
    nt = bn_threads_for(s.outer * s.channels * s.inner, t.units);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (u = 0; u < t.units; ++u)
        FN(stats_unit)(&t, s, x, xs, u, scratch, scratch + s.channels * t.parts);
    bn_merge_moments(&t, s, scratch, scratch + s.channels * t.parts, mean, var, nt);
    free(scratch);
    return BN_OK;
}

#undef FN
