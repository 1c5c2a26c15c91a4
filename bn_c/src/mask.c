/* Masked statistics: a call's mask (bn_mask_of) and the positions it sets in each part of
 * a tiling. Compiled once, shared by every ISA. */
#include "unit.h"

/* Whether the mask bytes of a rows x len block lie back to back (channels-last rows, or
 * planar rows taken whole): then they are counted and searched as one run. */
static int mask_contiguous(const bn_mask *mk, ptrdiff_t rows, ptrdiff_t len)
{
    return (len == 1 || mk->mi == 1) && (rows == 1 || mk->mo == len);
}

/* Set bytes of the mask over rows [o0, o0 + rows) x inner [i0, i0 + len), eight bytes at a
 * time wherever they are contiguous. */
static ptrdiff_t mask_block_count(const bn_mask *mk, ptrdiff_t o0, ptrdiff_t rows,
                                  ptrdiff_t i0, ptrdiff_t len)
{
    const unsigned char *m = mk->m + o0 * mk->mo + i0 * mk->mi;
    ptrdiff_t o, i, set = 0;
    if (mask_contiguous(mk, rows, len)) return bn_mask_count(m, rows * len);
    for (o = 0; o < rows; ++o) {
        const unsigned char *row = m + o * mk->mo;
        if (mk->mi == 1)
            set += bn_mask_count(row, len);
        else
            for (i = 0; i < len; ++i) set += row[i * mk->mi] != 0;
    }
    return set;
}

int bn_mask_of(const bn_options *opt, bn_shape s, bn_mask *mk)
{
    ptrdiff_t o, i;
    mk->m = NULL, mk->ro = mk->ri = 0, mk->count = 0.0;
    if (!opt || !opt->mask) return 0;
    if (opt->mask_strides.channel != 0 && s.channels > 1) return BN_ERR_ARG;
    mk->m = opt->mask, mk->mo = opt->mask_strides.outer, mk->mi = opt->mask_strides.inner;
    mk->count = (double)mask_block_count(mk, 0, s.outer, 0, s.inner);
    if (mk->count == 0) return 0; /* nothing set: every statistic is NaN; ro = ri = 0 */
    /* the first set position */
    if (mask_contiguous(mk, s.outer, s.inner)) {
        i = bn_mask_span(mk->m, 1, s.outer * s.inner, 0);
        mk->ro = i / s.inner, mk->ri = i % s.inner;
        return 0;
    }
    for (o = 0;; ++o) {
        i = bn_mask_span(mk->m + o * mk->mo, mk->mi, s.inner, 0);
        if (i < s.inner) {
            mk->ro = o, mk->ri = i;
            return 0;
        }
    }
}

void bn_part_mask_counts(const bn_tiling *t, bn_shape s, const bn_mask *mk, double *pcount)
{
    ptrdiff_t k;
    for (k = 0; k < t->parts; ++k) {
        ptrdiff_t ob = t->planar ? k / t->n_ib : k, ib = t->planar ? k % t->n_ib : 0;
        ptrdiff_t o0 = ob * t->ob, i0 = ib * t->ib;
        pcount[k] = (double)mask_block_count(mk, o0, bn_min(t->ob, s.outer - o0), i0,
                                             bn_min(t->ib, s.inner - i0));
    }
}
