/* Where a work unit lies in the (outer, channels, inner) view. */
#ifndef BN_UNIT_H
#define BN_UNIT_H

#include <stdint.h>
#include <string.h>

#include "internal.h"

typedef struct bn_unit {
    ptrdiff_t c0, cn;   /* channels [c0, c0 + cn) */
    ptrdiff_t o0, rows; /* outer rows [o0, o0 + rows) */
    ptrdiff_t i0, len;  /* inner run [i0, i0 + len) */
    ptrdiff_t k;        /* index of this unit's partial result within each channel */
    ptrdiff_t slot;     /* where channel c0's partial k goes; c0 + j's is at slot + j */
} bn_unit;

static inline ptrdiff_t bn_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static inline ptrdiff_t bn_max(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }
static inline ptrdiff_t bn_ceil_div(ptrdiff_t a, ptrdiff_t b)
{
    return b > 0 ? (a + b - 1) / b : 0;
}

/* The channel `step` (at most one vector) elements further on in a flat channels-last run of
 * C channels: no division in the loop. */
static inline ptrdiff_t bn_next_channel(ptrdiff_t c, ptrdiff_t step, ptrdiff_t C)
{
    for (c += step; c >= C; c -= C) {}
    return c;
}

static inline bn_unit bn_unit_at(const bn_tiling *t, bn_shape s, ptrdiff_t u)
{
    bn_unit w;
    ptrdiff_t ob, ib;
    if (t->planar) {
        w.k = u % t->parts;
        w.c0 = (u / t->parts) * t->cb, w.cn = bn_min(t->cb, t->c_count - w.c0);
        w.c0 += t->c_begin;
        ob = w.k / t->n_ib, ib = w.k % t->n_ib;
    } else {
        ob = u / t->n_cb, ib = 0, w.k = ob;
        w.c0 = (u % t->n_cb) * t->cb, w.cn = bn_min(t->cb, t->c_count - w.c0);
        w.c0 += t->c_begin;
    }
    w.slot = w.k * BN_PART_STRIDE(t->c_count) + (w.c0 - t->c_begin);
    w.o0 = ob * t->ob, w.rows = bn_min(t->ob, s.outer - w.o0);
    w.i0 = ib * t->ib, w.len = bn_min(t->ib, s.inner - w.i0);
    return w;
}

/* How many of the n mask bytes at m (stride step) from the first on are set (set = 1) or
 * clear (set = 0) in a row: runs of a mask are found eight bytes at a time where the bytes
 * are contiguous (NumPy's booleans are 0 or 1; any other byte is looked at alone). */
static inline ptrdiff_t bn_mask_span(const unsigned char *m, ptrdiff_t step, ptrdiff_t n,
                                     int set)
{
    const uint64_t all = set ? UINT64_C(0x0101010101010101) : 0;
    ptrdiff_t i = 0;
    uint64_t w;
    if (step == 1)
        for (; i + 8 <= n; i += 8) {
            memcpy(&w, m + i, 8);
            if (w != all) break;
        }
    for (; i < n && (m[i * step] != 0) == set; ++i) {}
    return i;
}

/* How many of the n contiguous mask bytes at m are set, eight at a time. */
static inline ptrdiff_t bn_mask_count(const unsigned char *m, ptrdiff_t n)
{
    const uint64_t ones = UINT64_C(0x0101010101010101);
    ptrdiff_t i = 0, set = 0;
    uint64_t w;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, m + i, 8);
        w |= w >> 4, w |= w >> 2, w |= w >> 1; /* each byte: 1 if it was nonzero (bit 0) */
        set += (ptrdiff_t)(((w & ones) * ones) >> 56);
    }
    for (; i < n; ++i) set += m[i] != 0;
    return set;
}

/* Element (o, c, i) of an array with strides st. */
#define BN_AT(p, st, o, c, i) ((p) + (o) * (st).outer + (c) * (st).channel + (i) * (st).inner)

#endif
