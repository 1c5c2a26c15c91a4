/* Batch statistics for element type BN_T. Included once per type by stats.c. */
#include "units_impl.h"

/* The reductions, then the merge, of one call. Their worksharing constructs bind to the
 * caller's team, as in train_chunks: inside a parallel region the threads share each loop,
 * outside it they run serially. */
static void FN(stats_passes)(const bn_tiling *t, bn_shape s, const BN_T *x, bn_strides xs,
                             double *scratch, ptrdiff_t size, double *mean, double *var)
{
    ptrdiff_t u, b, blocks = bn_merge_blocks(t);
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
    for (u = 0; u < t->units; ++u) FN(stats_unit)(t, s, x, xs, u, scratch, scratch + size);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (b = 0; b < blocks; ++b) bn_merge_moments(t, s, scratch, scratch + size, mean, var, b);
}

int BN_EXPORT(bn_stats, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, double *mean,
                               double *var)
{
    bn_tiling t;
    double *scratch;
    ptrdiff_t c, size;
    int nt;
    if (!bn_shape_ok(s) || (s.channels > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (s.channels == 0) return BN_OK;
    if (s.outer == 0 || s.inner == 0) {
        for (c = 0; c < s.channels; ++c) mean[c] = var[c] = NAN;
        return BN_OK;
    }
    if (!x) return BN_ERR_ARG;
    t = bn_make_tiling(s, 0, s.channels);
    size = t.parts * BN_PART_STRIDE(s.channels);
    scratch = (double *)bn_alloc_aligned(sizeof(double) * 2 * (size_t)size);
    if (!scratch) return BN_ERR_NOMEM;
    nt = bn_threads_for(s.outer * s.channels * s.inner, 1, t.units);
    if (nt > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
        FN(stats_passes)(&t, s, x, xs, scratch, size, mean, var);
    } else {
        FN(stats_passes)(&t, s, x, xs, scratch, size, mean, var);
    }
    bn_free_aligned(scratch);
    return BN_OK;
}

#undef FN
