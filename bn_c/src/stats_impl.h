/* Batch statistics for element type BN_T. Included once per type by stats.c. */
#include "units_impl.h"

/* Partial results of one chunk of channels take at most about this many bytes (unless a
 * single merge block of channels needs more): batch statistics of a tall input (many rows,
 * each its own partial) would otherwise need scratch in proportion to rows x channels. */
#define BN_STATS_SCRATCH_BYTES ((size_t)8 << 20)

/* The reductions, then the merge, chunk of channels by chunk, on the team of BN_ON_THREADS
 * (internal.h). A channel's pieces, and so its results, do not depend on the chunks. */
static void FN(stats_chunks)(int team, bn_shape s, const BN_T *x, bn_strides xs,
                             const bn_mask *mk, ptrdiff_t cc, double *scratch, ptrdiff_t size,
                             double *mean, double *var)
{
    double *pcount = mk->m ? scratch + 2 * size : NULL;
    ptrdiff_t c0, u, b;
    for (c0 = 0; c0 < s.channels; c0 += cc) {
        bn_tiling t = bn_make_tiling(s, c0, bn_min(cc, s.channels - c0));
        ptrdiff_t width = BN_MERGE_WIDTH(team), blocks = bn_ceil_div(t.c_count, width);
        BN_FOR_DYNAMIC(team, u, t.units, {
            if (pcount)
                FN(masked_stats_unit)(&t, s, x, xs, mk, u, scratch, scratch + size, pcount);
            else
                FN(stats_unit)(&t, s, x, xs, u, scratch, scratch + size);
        });
        BN_FOR_STATIC(team, b, blocks, {
            ptrdiff_t lo = b * width, nc = bn_min(width, t.c_count - lo);
            bn_merge_moments(&t, s, scratch, scratch + size, pcount, mean + c0, var + c0, lo, nc);
            FN(add_references)(&t, x, xs, mk, mean + c0, lo, nc);
        });
    }
}

int BN_EXPORT(bn_stats, BN_TN)(bn_shape s, const BN_T *x, bn_strides xs, double *mean,
                               double *var, const bn_options *opt)
{
    bn_mask mk;
    bn_tiling t;
    double *scratch;
    ptrdiff_t c, cc, size;
    size_t per_channel;
    int nt;
    if (!bn_shape_ok(s) || (s.channels > 0 && (!mean || !var))) return BN_ERR_ARG;
    if (s.channels == 0) return BN_OK;
    if (s.outer == 0 || s.inner == 0) {
        for (c = 0; c < s.channels; ++c) mean[c] = var[c] = NAN;
        return BN_OK;
    }
    if (!x || bn_mask_of(opt, s, &mk) < 0) return BN_ERR_ARG;
    /* the parts per channel follow from the whole shape, the same for every chunk */
    t = bn_make_tiling(s, 0, s.channels);
    per_channel = 2 * sizeof(double) * (size_t)t.parts;
    cc = s.channels;
    if (per_channel * (size_t)BN_PART_STRIDE(cc) > BN_STATS_SCRATCH_BYTES) {
        cc = (ptrdiff_t)(BN_STATS_SCRATCH_BYTES / per_channel) / BN_MERGE_BLOCK * BN_MERGE_BLOCK;
        if (cc < BN_MERGE_BLOCK) cc = BN_MERGE_BLOCK;
    }
    if (cc < s.channels) t = bn_make_tiling(s, 0, cc);
    size = t.parts * BN_PART_STRIDE(cc);
    /* partial means and M2, then (masked) the parts' counts */
    scratch = (double *)bn_alloc_aligned(sizeof(double) * (2 * (size_t)size + (size_t)t.parts));
    if (!scratch) return BN_ERR_NOMEM;
    if (mk.m) bn_part_mask_counts(&t, s, &mk, scratch + 2 * size);
    nt = bn_threads_for(s.outer * s.channels * s.inner, 1, t.units);
    BN_ON_THREADS(nt, FN(stats_chunks), s, x, xs, &mk, cc, scratch, size, mean, var);
    bn_free_aligned(scratch);
    return BN_OK;
}

#undef FN
