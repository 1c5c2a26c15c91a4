/* What one work unit does (see unit.h for where a unit lies), for element type BN_T.
 * Included once per element type by each kernel family; no include guard on purpose. */
#include "runs_impl.h"

/* Partial mean and M2 (sum of squared deviations) of a unit, from sums of d = x - K with the
 * shift K = the unit's first value: one pass, exact zero variance for a constant channel.
 * When K lies far from the mean (M2 below 2^-10 of the sum of d*d, i.e. more than ~3 of 16
 * digits lost to cancellation) the pass is redone, from cache, with K = the mean just found.
 * Traffic: one read of x. */
#define BN_REDO_BELOW (1.0 / 1024.0)

/* The reference of channel c: its first value (with a mask, its first unmasked value; 0 if
 * that is not finite). Partial means are
 * stored relative to it, so that Chan's merge of many partials works with numbers at the
 * scale of the spread, not of the mean: at 1e10 + N(0, 1) the partial means themselves
 * carry an error of ulp(1e10) = 2e-6 each, which the merge turned into a relative variance
 * error of 1e-8. The merged mean gets the reference back (add_references). */
static inline double FN(reference)(const BN_T *x, bn_strides xs, ptrdiff_t c, const bn_mask *mk)
{
    double v = mk && mk->m ? (double)BN_LD(BN_AT(x, xs, mk->ro, c, mk->ri))
                           : (double)BN_LD(BN_AT(x, xs, 0, c, 0));
    return isfinite(v) ? v : 0.0;
}

/* The merged means of channels [lo, lo + nc) of tiling t (indexed from t->c_begin) are
 * relative to the channels' references: make them absolute. */
static inline void FN(add_references)(const bn_tiling *t, const BN_T *x, bn_strides xs,
                                      const bn_mask *mk, double *mean, ptrdiff_t lo,
                                      ptrdiff_t nc)
{
    ptrdiff_t j;
    for (j = lo; j < lo + nc; ++j) mean[j] += FN(reference)(x, xs, t->c_begin + j, mk);
}

/* Masked statistics of channel c over a planar unit: sums of d = x - k over the unmasked
 * positions (the unit's count is its part's, bn_part_mask_counts). Contiguous rows and mask (the route
 * always passes such a mask): one run_dev over the unit with masked lanes zeroed, the
 * unmasked unit's lanes and order (so an all-true mask gives its bits). Otherwise (callers
 * of the C API with a strided mask) as runs: rows the mask wholly sets go to run_dev
 * together, and the set runs of other rows one by one. */
static inline void FN(masked_run_dev)(const bn_mask *mk, const BN_T *x, bn_strides xs,
                                      const bn_unit *w, ptrdiff_t c, double k, double *sd,
                                      double *sdd)
{
    ptrdiff_t o, i, len, full = 0;
    if (xs.inner == 1 && mk->mi == 1) { /* one pass, masked lanes: short runs cost nothing */
        FN(run_dev)(BN_AT(x, xs, w->o0, c, w->i0), xs.outer, w->rows, w->len, 1, k, sd, sdd,
                    mk->m + w->o0 * mk->mo + w->i0, mk->mo);
        return;
    }
    for (o = w->o0; o <= w->o0 + w->rows; ++o) {
        const unsigned char *mr = o < w->o0 + w->rows ? mk->m + o * mk->mo + w->i0 * mk->mi : NULL;
        if (mr && bn_mask_span(mr, mk->mi, w->len, 1) == w->len) {
            ++full;
            continue;
        }
        if (full) /* the whole rows just before o */
            FN(run_dev)(BN_AT(x, xs, o - full, c, w->i0), xs.outer, full, w->len, xs.inner, k,
                        sd, sdd, NULL, 0);
        full = 0;
        for (i = 0; mr && i < w->len; i += len) {
            i += bn_mask_span(mr + i * mk->mi, mk->mi, w->len - i, 0);
            len = bn_mask_span(mr + i * mk->mi, mk->mi, w->len - i, 1);
            if (len)
                FN(run_dev)(BN_AT(x, xs, o, c, w->i0 + i), xs.outer, 1, len, xs.inner, k, sd,
                            sdd, NULL, 0);
        }
    }
}

/* The same over an interleaved unit (inner == 1): runs of consecutive unmasked rows. */
static inline void FN(masked_cols_dev)(const bn_mask *mk, const BN_T *x, bn_strides xs,
                                       const bn_unit *w, const double *k, double *sd,
                                       double *sdd)
{
    const unsigned char *mr = mk->m + w->o0 * mk->mo;
    ptrdiff_t o, len;
    for (o = 0; o < w->rows; o += len) {
        o += bn_mask_span(mr + o * mk->mo, mk->mo, w->rows - o, 0);
        len = bn_mask_span(mr + o * mk->mo, mk->mo, w->rows - o, 1);
        if (len)
            FN(cols_dev_rows)(BN_AT(x, xs, w->o0 + o, w->c0, 0), xs.outer, len, xs.channel,
                              w->cn, k, sd, sdd);
    }
}

/* The first position of a unit that the mask sets (rows, then inner), or 0 when none. */
static inline int FN(first_set)(const bn_mask *mk, const bn_unit *w, ptrdiff_t *po,
                                ptrdiff_t *pi)
{
    ptrdiff_t o, i;
    for (o = w->o0; o < w->o0 + w->rows; ++o)
        for (i = w->i0; i < w->i0 + w->len; ++i)
            if (BN_MASKED_IN(mk, o, i)) return *po = o, *pi = i, 1;
    return 0;
}

/* Partial statistics of a unit over its unmasked positions (see stats_unit), whose number
 * is its part's count, pcount[w.k] (bn_part_mask_counts: counted once per call, not per
 * channel). */
static inline void FN(masked_stats_unit)(const bn_tiling *t, bn_shape s, const BN_T *x,
                                         bn_strides xs, const bn_mask *mk, ptrdiff_t u,
                                         double *pmean, double *pm2, const double *pcount)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t j, fo, fi;
    double n = pcount[w.k];
    if (n == 0.0 || !FN(first_set)(mk, &w, &fo, &fi)) {
        for (j = 0; j < w.cn; ++j) pmean[w.slot + j] = pm2[w.slot + j] = 0.0;
    } else if (t->planar) {
        for (j = 0; j < w.cn; ++j) {
            ptrdiff_t c = w.c0 + j;
            double k = (double)BN_LD(BN_AT(x, xs, fo, c, fi)), sd = 0.0, sdd = 0.0, m2;
            FN(masked_run_dev)(mk, x, xs, &w, c, k, &sd, &sdd);
            m2 = sdd - sd * (sd / n);
            if (m2 < sdd * BN_REDO_BELOW) {
                k = (double)(BN_CT)(k + sd / n), sd = sdd = 0.0;
                FN(masked_run_dev)(mk, x, xs, &w, c, k, &sd, &sdd);
                m2 = sdd - sd * (sd / n);
            }
            pmean[w.slot + j] = (k - FN(reference)(x, xs, c, mk)) + sd / n;
            pm2[w.slot + j] = m2;
        }
    } else {
        double k[BN_MAX_CHANNEL_BLOCK], sd[BN_MAX_CHANNEL_BLOCK], sdd[BN_MAX_CHANNEL_BLOCK];
        const BN_T *base = BN_AT(x, xs, fo, w.c0, 0);
        int redo = 0;
        for (j = 0; j < w.cn; ++j) k[j] = (double)BN_LD(base + j * xs.channel), sd[j] = sdd[j] = 0.0;
        FN(masked_cols_dev)(mk, x, xs, &w, k, sd, sdd);
        for (j = 0; j < w.cn; ++j) redo |= sdd[j] - sd[j] * (sd[j] / n) < sdd[j] * BN_REDO_BELOW;
        if (redo) {
            for (j = 0; j < w.cn; ++j)
                k[j] = (double)(BN_CT)(k[j] + sd[j] / n), sd[j] = sdd[j] = 0.0;
            FN(masked_cols_dev)(mk, x, xs, &w, k, sd, sdd);
        }
        for (j = 0; j < w.cn; ++j) {
            pmean[w.slot + j] = (k[j] - FN(reference)(x, xs, w.c0 + j, mk)) + sd[j] / n;
            pm2[w.slot + j] = sdd[j] - sd[j] * (sd[j] / n);
        }
    }
}

static inline void FN(stats_unit)(const bn_tiling *t, bn_shape s, const BN_T *x, bn_strides xs,
                                  ptrdiff_t u, double *pmean, double *pm2)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t j;
    if (t->planar) {
        double n = (double)(w.rows * w.len);
        for (j = 0; j < w.cn; ++j) {
            const BN_T *base = BN_AT(x, xs, w.o0, w.c0 + j, w.i0);
            double k = (double)BN_LD(base), sd = 0.0, sdd = 0.0, m2;
            FN(run_dev)(base, xs.outer, w.rows, w.len, xs.inner, k, &sd, &sdd, NULL, 0);
            m2 = sdd - sd * (sd / n);
            if (m2 < sdd * BN_REDO_BELOW) {
                k = (double)(BN_CT)(k + sd / n), sd = sdd = 0.0;
                FN(run_dev)(base, xs.outer, w.rows, w.len, xs.inner, k, &sd, &sdd, NULL, 0);
                m2 = sdd - sd * (sd / n);
            }
            pmean[w.slot + j] = (k - FN(reference)(x, xs, w.c0 + j, NULL)) + sd / n;
            pm2[w.slot + j] = m2;
        }
    } else {
        double k[BN_MAX_CHANNEL_BLOCK], sd[BN_MAX_CHANNEL_BLOCK], sdd[BN_MAX_CHANNEL_BLOCK];
        const BN_T *base = BN_AT(x, xs, w.o0, w.c0, 0);
        double n = (double)w.rows;
        int redo = 0;
        for (j = 0; j < w.cn; ++j) k[j] = (double)BN_LD(base + j * xs.channel), sd[j] = sdd[j] = 0.0;
        FN(cols_dev_rows)(base, xs.outer, w.rows, xs.channel, w.cn, k, sd, sdd);
        for (j = 0; j < w.cn; ++j) redo |= sdd[j] - sd[j] * (sd[j] / n) < sdd[j] * BN_REDO_BELOW;
        if (redo) {
            for (j = 0; j < w.cn; ++j)
                k[j] = (double)(BN_CT)(k[j] + sd[j] / n), sd[j] = sdd[j] = 0.0;
            FN(cols_dev_rows)(base, xs.outer, w.rows, xs.channel, w.cn, k, sd, sdd);
        }
        for (j = 0; j < w.cn; ++j) {
            pmean[w.slot + j] = (k[j] - FN(reference)(x, xs, w.c0 + j, NULL)) + sd[j] / n;
            pm2[w.slot + j] = sdd[j] - sd[j] * (sd[j] / n);
        }
    }
}

/* Whether v is NaN or infinite: one comparison (NaN compares false), which vectorises. */
static inline int FN(nonfinite)(BN_CT v) { return !(fabs(v) <= BN_CT_MAX); }

/* A channel whose coefficients do not fit the compute type takes the exact path (the
 * coefficient passes count them, and units look only when there are some). */
static inline int FN(wide)(const BN_CT *m, const BN_CT *a, const BN_CT *b, const BN_CT *c,
                           ptrdiff_t k)
{
    /* bitwise operators: a count of wide channels stays a vector loop */
    return FN(nonfinite)(m[k]) | FN(nonfinite)(a[k]) | (b ? FN(nonfinite)(b[k]) : 0) |
           (c ? FN(nonfinite)(c[k]) : 0);
}

/* Whether a coefficient computed in double loses precision in the compute type: it
 * overflows, or it is subnormal there (a float32 scale of 1e-40 keeps 2 digits; a backward
 * coefficient near 1/var of a channel spread over 1e25 flushes to 0). Such channels take
 * the exact path, computed in double from the original parameters. */
static inline int FN(lossy)(double v)
{
    double m = fabs(v); /* bitwise operators: no branches, so the loops stay vectorised */
    return (!(m <= (double)BN_CT_MAX)) | ((m != 0.0) & (m < (double)BN_CT_MIN));
}

/* Whether x - m can be inf or lose digits in the compute type. With the batch's own
 * statistics (n values per channel, n > 0), |x - mean| is at most sqrt(n * var): a channel
 * where that bound passes half the compute type's range could compute x - m as inf, and one
 * where it is subnormal there loses digits in x - m (compared squared: no square root).
 * With given statistics (n == 0) x is bounded only by its type, |x| <= BN_CT_MAX: x - m
 * rounds to at most BN_CT_MAX while |m| is below half the spacing of numbers there, and may
 * overflow from that |m| on (float32 data near 3e38 and a mean of the other sign). Masked
 * statistics (n = -count) normalize the masked values too: both rules hold. */
static inline int FN(lossy_spread)(double n, double var, double m)
{
    const double top = 0.25 * (double)BN_CT_MAX * (double)BN_CT_MAX; /* inf for double */
    const double bottom = (double)BN_CT_MIN * (double)BN_CT_MIN;     /* 0 for double */
    double s2 = fabs(n) * var;
    return ((n != 0.0) & ((s2 > top) | ((s2 != 0.0) & (s2 < bottom)))) |
           ((n <= 0.0) & (fabs(m) >= BN_CT_HALF_ULP_MAX));
}

/* The per-call context of the elementwise passes (see bn_call), with the forward's epilogue
 * from opt (NULL: none); the training backward adds its sums. */
static inline bn_call FN(call_of)(bn_shape s, const double *mean, const double *var,
                                  const double *gamma, const double *beta, double eps,
                                  const int *wide, const bn_options *opt)
{
    bn_call e;
    e.stream = (double)(s.outer * s.channels * s.inner) * sizeof(BN_T) >= BN_STREAM_MIN_BYTES;
    e.wide = wide;
    e.mean = mean, e.var = var, e.gamma = gamma, e.beta = beta, e.eps = eps;
    e.sdy = e.sdyxhat = NULL, e.c_begin = 0, e.n = 0.0;
    e.z = opt ? opt->residual : NULL, e.relu = opt && opt->activation == BN_ACT_RELU;
    e.zs.outer = e.zs.channel = e.zs.inner = 0;
    if (e.z) e.zs = opt->residual_strides;
    return e;
}

/* Per-channel coefficients of y = (x - m) * a + b in the storage type, for channels
 * [c0, c0 + cc). m is the mean rounded to the compute type; the rounding is folded into b (in double),
 * so x - m is exact for x near the mean and the output keeps full precision even when the
 * mean is large next to the spread. */
static inline int FN(affine_lossy)(double n, double var, double m, double scale,
                                    double shift)
{
    return FN(lossy)(scale) | FN(lossy)(shift) | FN(lossy_spread)(n, var, m);
}

static inline int FN(affine_coefficients)(ptrdiff_t c0, ptrdiff_t cc, const double *mean,
                                           const double *var, const double *gamma,
                                           const double *beta, double eps, double n, BN_CT *m,
                                           BN_CT *a, BN_CT *b)
{
    ptrdiff_t c;
    int wide = 0, lossy = 0;
    for (c = c0; c < c0 + cc; ++c) {
        double scale = (gamma ? gamma[c] : 1.0) / sqrt(var[c] + eps), shift;
        m[c] = (BN_CT)mean[c];
        shift = (beta ? beta[c] : 0.0) + ((double)m[c] - mean[c]) * scale;
        a[c] = (BN_CT)scale;
        b[c] = (BN_CT)shift;
        wide += FN(wide)(m, a, b, NULL, c);
        lossy |= FN(affine_lossy)(n, var[c], (double)m[c], scale, shift);
    }
    /* rare: mark the lossy channels with what FN(wide) counts (the exact path reads no
     * coefficient); kept out of the loop above, which stays vectorised */
    for (c = c0; lossy && c < c0 + cc; ++c) {
        double scale = (gamma ? gamma[c] : 1.0) / sqrt(var[c] + eps);
        double shift = (beta ? beta[c] : 0.0) + ((double)m[c] - mean[c]) * scale;
        if (!FN(wide)(m, a, b, NULL, c) &&
            FN(affine_lossy)(n, var[c], (double)m[c], scale, shift))
            a[c] = (BN_CT)NAN, ++wide;
    }
    return wide;
}

/* Non-temporal stores only on runs written by them alone (aligned start, whole vectors) or of
 * at least BN_STREAM_MIN_RUN bytes: the ordinary stores of a run's unaligned ends share cache
 * lines with its streamed body, and a line written both ways is flushed part by part. On
 * rows of 224 bytes (channels-last, C = 56) that made the backward 4x slower; on long runs
 * it is one line in hundreds. */
#define BN_STREAM_MIN_RUN 4096
#define BN_STREAM_RUN(e, p, n)                                                                \
    ((e)->stream && ((n) * (ptrdiff_t)sizeof(BN_T) >= BN_STREAM_MIN_RUN ||                     \
                     (!BN_MISALIGNED(p) && (n) * sizeof(BN_T) % BN_VBYTES == 0)))

/* Whether the units of an interleaved tiling are taken as flat runs of an array with strides
 * st: all channels in the tiling, rows back to back, and rows of at most one cache line, or
 * of at most 1 KB when the output is streamed (a row loop streams only rows that start
 * aligned). Measured (C harness, best of 400, 6.4 MB float32): with 8 or 16 channels the
 * flat loop was faster on 1 and 2 threads (eval 1.1-1.8x, backward 1.1-1.2x); from 32
 * channels up it was as often slower as faster, and 25% slower on rows of 4 KB; on a
 * streamed 26 MB output with 64 channels it took the backward from ~2.0x to ~1.6x the add. */
#define BN_FLAT_MAX_ROW_BYTES 64
#define BN_FLAT_MAX_STREAMED_ROW_BYTES 1024
static inline int FN(flat_rows)(const bn_tiling *t, bn_shape s, bn_strides st, int stream)
{
    ptrdiff_t row = s.channels * (ptrdiff_t)sizeof(BN_T);
    return (row <= BN_FLAT_MAX_ROW_BYTES || (stream && row <= BN_FLAT_MAX_STREAMED_ROW_BYTES)) &&
           t->c_begin == 0 && t->c_count == s.channels && st.channel == 1 &&
           st.outer == s.channels;
}

#if BN_V512_PATHS
/* Whether each row of planar unit w is one run of its channels' elements (unit strides,
 * channels one after the other), each channel's whole vectors, and fewer than the long
 * rows' BN_ALIGN_MIN_RUN: FN(ew_planar_row)'s rows. (With runs of 784, 28x28 images, it
 * made the backward 13-15% slower at NumPy's offset.) */
static inline int FN(planar_rows_whole)(const bn_unit *w, bn_strides st)
{
    return st.inner == 1 && st.channel == w->len && w->len % BN_W == 0 &&
           w->len < BN_ALIGN_MIN_RUN * BN_W;
}
#endif

/* Non-temporal stores are weakly ordered: fence them before the unit counts as done. */
static inline void FN(stream_fence)(int stream)
{
#if BN_SIMD
    if (stream && BN_CAN_STREAM) BN_SFENCE();
#else
    (void)stream;
#endif
}

/* End of the run of channels [j, cn) of one kind (wide or not) that starts at j. */
static inline ptrdiff_t FN(same_kind_end)(const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                          const BN_CT *c, ptrdiff_t k0, ptrdiff_t j, ptrdiff_t cn)
{
    int w = FN(wide)(m, a, b, c, k0 + j);
    while (++j < cn && FN(wide)(m, a, b, c, k0 + j) == w) {}
    return j;
}

/* The rows of interleaved unit w over channels [c, c + n), all wide (bn_exact_y) or none;
 * `long_run`: the driver's (see BN_ALIGNS_RUN; a constant, so rows too short for it keep
 * their loop as it was). */
BN_ALWAYS_INLINE void FN(affine_rows)(const bn_unit *w, ptrdiff_t c, ptrdiff_t n, int wide,
                                      int long_run, const BN_T *x, bn_strides xs, BN_T *y,
                                      bn_strides ys, const BN_CT *m, const BN_CT *a,
                                      const BN_CT *b, const bn_call *e, const BN_T *z,
                                      bn_strides zs, int relu)
{
    ptrdiff_t o = w->o0, q, end = w->o0 + w->rows;
#if BN_V512_PATHS
    if (!wide && !long_run && !e->stream && xs.channel == 1 && ys.channel == 1 &&
        (!z || zs.channel == 1))
        for (; o + 1 < end; o += 2) { /* see FN(ew_row_pair) */
            const BN_T *v = BN_AT(x, xs, o, c, 0), *zr = z ? BN_AT(z, zs, o, c, 0) : z;
            BN_T *r = BN_AT(y, ys, o, c, 0);
            FN(ew_row_pair)(BN_OP_AFFINE, n, v, v + xs.outer, NULL, NULL, zr,
                            z ? zr + zs.outer : z, relu, r, r + ys.outer, m + c, a + c, b + c,
                            NULL);
        }
#endif
    for (; o < end; ++o) {
        const BN_T *v = BN_AT(x, xs, o, c, 0), *zr = z ? BN_AT(z, zs, o, c, 0) : z;
        BN_T *r = BN_AT(y, ys, o, c, 0);
        if (wide)
            for (q = 0; q < n; ++q)
                FN(run_exact_y)(v + q * xs.channel, 0, r + q * ys.channel, 0, 1, e, c + q,
                                z ? zr + q * zs.channel : z, 0);
        else
            FN(elementwise)(BN_OP_AFFINE, BN_COEFS_EACH, n, 1, 0, v, xs.channel, NULL, 0, zr,
                            zs.channel, relu, NULL, r, ys.channel, m + c, a + c, b + c, NULL,
                            BN_STREAM_RUN(e, r, n), long_run);
    }
}

/* y = epi((x - m) * a + b) over a unit (wide channels: bn_exact_y), with the epilogue's z
 * (NULL: none, strides zs) and relu as constants of the caller. Traffic: read x (and z),
 * write y. */
BN_ALWAYS_INLINE void FN(affine_unit_epi)(const bn_tiling *t, bn_shape s, const BN_T *x,
                                          bn_strides xs, BN_T *y, bn_strides ys, ptrdiff_t u,
                                          const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                          const bn_call *e, const BN_T *z, bn_strides zs,
                                          int relu)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t o, c, j, end;
    if (t->planar) {
#if BN_V512_PATHS
        const int rows_whole = !*e->wide && !e->stream && FN(planar_rows_whole)(&w, xs) &&
                               FN(planar_rows_whole)(&w, ys) &&
                               (!z || FN(planar_rows_whole)(&w, zs));
#endif
        /* row by row, so that a row's channels are walked in memory order */
        for (o = w.o0; o < w.o0 + w.rows; ++o) {
#if BN_V512_PATHS
            if (rows_whole && BN_MISALIGNED(BN_AT(y, ys, o, w.c0, w.i0))) {
                FN(ew_planar_row)(BN_OP_AFFINE, w.cn, w.len, BN_AT(x, xs, o, w.c0, w.i0), NULL,
                                  z ? BN_AT(z, zs, o, w.c0, w.i0) : z, relu,
                                  BN_AT(y, ys, o, w.c0, w.i0), m + w.c0, a + w.c0, b + w.c0,
                                  NULL);
                continue;
            }
#endif
            for (c = w.c0; c < w.c0 + w.cn; ++c) {
                const BN_T *zr = z ? BN_AT(z, zs, o, c, w.i0) : z;
                if (*e->wide && FN(wide)(m, a, b, NULL, c))
                    FN(run_exact_y)(BN_AT(x, xs, o, c, w.i0), xs.inner, BN_AT(y, ys, o, c, w.i0),
                                    ys.inner, w.len, e, c, zr, zs.inner);
                else
                    FN(elementwise)(BN_OP_AFFINE, BN_COEFS_ONE, w.len, 1, c,
                                    BN_AT(x, xs, o, c, w.i0), xs.inner, NULL, 0, zr, zs.inner,
                                    relu, NULL, BN_AT(y, ys, o, c, w.i0), ys.inner, m, a, b,
                                    NULL, BN_STREAM_RUN(e, BN_AT(y, ys, o, c, w.i0), w.len), 0);
            }
        }
        FN(stream_fence)(e->stream);
        return;
    }
    if (!*e->wide && FN(flat_rows)(t, s, xs, e->stream) && FN(flat_rows)(t, s, ys, e->stream) &&
        (!z || FN(flat_rows)(t, s, zs, e->stream))) {
        ptrdiff_t n = w.rows * s.channels;
        const BN_T *v = BN_AT(x, xs, w.o0, 0, 0);
        BN_T *r = BN_AT(y, ys, w.o0, 0, 0);
        FN(elementwise)(BN_OP_AFFINE, BN_COEFS_WRAPPED, n, s.channels, 0, v, 1, NULL, 0,
                        z ? BN_AT(z, zs, w.o0, 0, 0) : z, 1, relu, NULL, r, 1, m, a, b, NULL,
                        BN_STREAM_RUN(e, r, n), 0);
        FN(stream_fence)(e->stream);
        return;
    }
    /* interleaved: rows of w.cn channels, cut into runs of wide and ordinary channels (one
     * run, the whole row, unless some channel is wide) */
    for (j = 0; j < w.cn; j = end) {
        int wide = *e->wide && FN(wide)(m, a, b, NULL, w.c0 + j);
        end = *e->wide ? FN(same_kind_end)(m, a, b, NULL, w.c0, j, w.cn) : w.cn;
        if (!wide && BN_ALIGNS_RUN(end - j))
            FN(affine_rows)(&w, w.c0 + j, end - j, 0, 1, x, xs, y, ys, m, a, b, e, z, zs, relu);
        else
            FN(affine_rows)(&w, w.c0 + j, end - j, wide, 0, x, xs, y, ys, m, a, b, e, z, zs,
                            relu);
    }
    FN(stream_fence)(e->stream);
}

/* The four epilogues, each its own inlined loop: the plain one carries none of the others. */
static inline void FN(affine_unit)(const bn_tiling *t, bn_shape s, const BN_T *x, bn_strides xs,
                                   BN_T *y, bn_strides ys, ptrdiff_t u, const BN_CT *m,
                                   const BN_CT *a, const BN_CT *b, const bn_call *e)
{
    const BN_T *z = (const BN_T *)e->z;
    if (!z && !e->relu)
        FN(affine_unit_epi)(t, s, x, xs, y, ys, u, m, a, b, e, NULL, e->zs, 0);
    else if (!z)
        FN(affine_unit_epi)(t, s, x, xs, y, ys, u, m, a, b, e, NULL, e->zs, 1);
    else if (!e->relu)
        FN(affine_unit_epi)(t, s, x, xs, y, ys, u, m, a, b, e, z, e->zs, 0);
    else
        FN(affine_unit_epi)(t, s, x, xs, y, ys, u, m, a, b, e, z, e->zs, 1);
}

/* Partial sums of dy and dy * (x - mean) of a unit. Traffic: read dy and x. */
static inline void FN(bwd_sums_unit)(const bn_tiling *t, bn_shape s, const BN_T *dy,
                                     bn_strides dys, const BN_T *x, bn_strides xs,
                                     const double *mean, ptrdiff_t u, double *psdy,
                                     double *psdyx)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t j;
    if (t->planar) {
        for (j = 0; j < w.cn; ++j) {
            ptrdiff_t c = w.c0 + j;
            double sdy = 0.0, sdyx = 0.0;
            FN(run_bwd_sums)(BN_AT(dy, dys, w.o0, c, w.i0), dys.outer, dys.inner,
                             BN_AT(x, xs, w.o0, c, w.i0), xs.outer, xs.inner, w.rows, w.len,
                             mean[c], &sdy, &sdyx);
            psdy[w.slot + j] = sdy;
            psdyx[w.slot + j] = sdyx;
        }
    } else {
        double sdy[BN_MAX_CHANNEL_BLOCK], sdyx[BN_MAX_CHANNEL_BLOCK];
        for (j = 0; j < w.cn; ++j) sdy[j] = sdyx[j] = 0.0;
        FN(cols_bwd_sums_rows)(BN_AT(dy, dys, w.o0, w.c0, 0), dys.outer, dys.channel,
                               BN_AT(x, xs, w.o0, w.c0, 0), xs.outer, xs.channel, w.rows, w.cn,
                               mean + w.c0, sdy, sdyx);
        for (j = 0; j < w.cn; ++j) {
            psdy[w.slot + j] = sdy[j];
            psdyx[w.slot + j] = sdyx[j];
        }
    }
}

/* dx of n values of channel k along inner: the exact path (wide), the training gradient
 * (b, at positions a mask sets), or a*dy. Forced inline: a call per row of a small image
 * cost 15% of a (8, 32, 8, 8) backward. */
BN_ALWAYS_INLINE void FN(dx_run)(const BN_T *g, bn_strides dys, const BN_T *v,
                                 bn_strides xs, BN_T *d, bn_strides dxs, ptrdiff_t n,
                                 const BN_CT *m, const BN_CT *a, const BN_CT *b, const BN_CT *c,
                                 const bn_call *e, ptrdiff_t k, int wide, int set)
{
    if (wide)
        FN(run_exact_dx)(g, dys.inner, v, xs.inner, d, dxs.inner, n, e, k, set);
    else if (b && set)
        FN(elementwise)(BN_OP_DX, BN_COEFS_ONE, n, 1, k, v, xs.inner, g, dys.inner, NULL, 0, 0,
                        NULL, d, dxs.inner, m, a, b, c, BN_STREAM_RUN(e, d, n), 0);
    else
        FN(elementwise)(BN_OP_SCALE, BN_COEFS_ONE, n, 1, k, NULL, 0, g, dys.inner, NULL, 0, 0,
                        NULL, d, dxs.inner, NULL, a, NULL, NULL, BN_STREAM_RUN(e, d, n), 0);
}

/* dx of row o of channel k of a planar unit under a mask: one pass with masked lanes where
 * the arrays are contiguous, else runs of set and unset positions. A function of its own
 * (not inlined): inlined, the masked loops made the unmasked row loop around them 6% slower
 * on a (8, 32, 8, 8) backward. */
static void FN(masked_dx_row)(const bn_unit *w, const BN_T *dy, bn_strides dys, const BN_T *x,
                              bn_strides xs, BN_T *dx, bn_strides dxs, ptrdiff_t o, ptrdiff_t k,
                              const BN_CT *m, const BN_CT *a, const BN_CT *b, const BN_CT *c,
                              const bn_call *e, const bn_mask *mk, int wide)
{
    ptrdiff_t i, len;
    if (!wide && mk->mi == 1 && dys.inner == 1 && xs.inner == 1 && dxs.inner == 1) {
        BN_T *d = BN_AT(dx, dxs, o, k, w->i0);
        FN(elementwise)(BN_OP_DX, BN_COEFS_ONE, w->len, 1, k, BN_AT(x, xs, o, k, w->i0), 1,
                        BN_AT(dy, dys, o, k, w->i0), 1, NULL, 0, 0, mk->m + o * mk->mo + w->i0,
                        d, 1, m, a, b, c, BN_STREAM_RUN(e, d, w->len), 0);
        return;
    }
    for (i = w->i0; i < w->i0 + w->len; i += len) {
        int set = BN_MASKED_IN(mk, o, i);
        len = bn_mask_span(mk->m + o * mk->mo + i * mk->mi, mk->mi, w->i0 + w->len - i, set);
        FN(dx_run)(BN_AT(dy, dys, o, k, i), dys, BN_AT(x, xs, o, k, i), xs,
                   BN_AT(dx, dxs, o, k, i), dxs, len, m, a, b, c, e, k, wide, set);
    }
}

/* The rows of interleaved unit w over channels [k, k + n), all wide (bn_exact_dx) or none;
 * rows the mask (NULL: none) leaves out get a*dy; `long_run` as in affine_rows. */
BN_ALWAYS_INLINE void FN(dx_rows)(const bn_unit *w, ptrdiff_t k, ptrdiff_t n, int wide,
                                  int long_run, const BN_T *dy, bn_strides dys, const BN_T *x,
                                  bn_strides xs, BN_T *dx, bn_strides dxs, const BN_CT *m,
                                  const BN_CT *a, const BN_CT *b, const BN_CT *c,
                                  const bn_call *e, const bn_mask *mk)
{
    ptrdiff_t o = w->o0, q, end = w->o0 + w->rows;
#if BN_V512_PATHS
    if (!wide && !long_run && !mk && !e->stream && dys.channel == 1 && dxs.channel == 1 &&
        (!b || xs.channel == 1))
        for (; o + 1 < end; o += 2) { /* see FN(ew_row_pair) */
            const BN_T *g = BN_AT(dy, dys, o, k, 0);
            BN_T *d = BN_AT(dx, dxs, o, k, 0);
            if (b) {
                const BN_T *v = BN_AT(x, xs, o, k, 0);
                FN(ew_row_pair)(BN_OP_DX, n, v, v + xs.outer, g, g + dys.outer, NULL, NULL, 0, d,
                                d + dxs.outer, m + k, a + k, b + k, c + k);
            } else {
                FN(ew_row_pair)(BN_OP_SCALE, n, NULL, NULL, g, g + dys.outer, NULL, NULL, 0, d,
                                d + dxs.outer, NULL, a + k, NULL, NULL);
            }
        }
#endif
    for (; o < end; ++o) {
        int set = !mk || BN_MASKED_IN(mk, o, 0);
        const BN_T *g = BN_AT(dy, dys, o, k, 0), *v = x ? BN_AT(x, xs, o, k, 0) : x;
        BN_T *d = BN_AT(dx, dxs, o, k, 0);
        if (wide)
            for (q = 0; q < n; ++q)
                FN(run_exact_dx)(g + q * dys.channel, 0, v ? v + q * xs.channel : v, 0,
                                 d + q * dxs.channel, 0, 1, e, k + q, set);
        else if (b && set)
            FN(elementwise)(BN_OP_DX, BN_COEFS_EACH, n, 1, 0, v, xs.channel, g, dys.channel,
                            NULL, 0, 0, NULL, d, dxs.channel, m + k, a + k, b + k, c + k,
                            BN_STREAM_RUN(e, d, n), long_run);
        else
            FN(elementwise)(BN_OP_SCALE, BN_COEFS_EACH, n, 1, 0, NULL, 0, g, dys.channel, NULL,
                            0, 0, NULL, d, dxs.channel, NULL, a + k, NULL, NULL,
                            BN_STREAM_RUN(e, d, n), long_run);
    }
}

/* dx over a unit: a*dy + (b*(x-m) + c) (training) or a*dy (frozen: b == NULL); wide
 * channels: bn_exact_dx. With a mask (masked training, else NULL), positions it leaves out
 * get a*dy, their x being in no statistic: planar rows as one pass with masked lanes where
 * the arrays are contiguous, else as runs of set and unset positions; channels-last rows
 * whole. Traffic: read dy (and x), write dx. */
static inline void FN(bwd_dx_unit)(const bn_tiling *t, bn_shape s, const BN_T *dy,
                                   bn_strides dys, const BN_T *x, bn_strides xs, BN_T *dx,
                                   bn_strides dxs, ptrdiff_t u, const BN_CT *m, const BN_CT *a,
                                   const BN_CT *b, const BN_CT *c, const bn_call *e,
                                   const bn_mask *mk)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t o, k, j, end;
    if (t->planar) {
#if BN_V512_PATHS
        const int rows_whole = !mk && !*e->wide && !e->stream &&
                               FN(planar_rows_whole)(&w, dys) && FN(planar_rows_whole)(&w, dxs) &&
                               (!b || FN(planar_rows_whole)(&w, xs));
#endif
        for (o = w.o0; o < w.o0 + w.rows; ++o) { /* row by row, as in affine_unit */
#if BN_V512_PATHS
            if (rows_whole && BN_MISALIGNED(BN_AT(dx, dxs, o, w.c0, w.i0))) {
                BN_T *d = BN_AT(dx, dxs, o, w.c0, w.i0);
                const BN_T *g = BN_AT(dy, dys, o, w.c0, w.i0);
                if (b)
                    FN(ew_planar_row)(BN_OP_DX, w.cn, w.len, BN_AT(x, xs, o, w.c0, w.i0), g,
                                      NULL, 0, d, m + w.c0, a + w.c0, b + w.c0, c + w.c0);
                else
                    FN(ew_planar_row)(BN_OP_SCALE, w.cn, w.len, NULL, g, NULL, 0, d, NULL,
                                      a + w.c0, NULL, NULL);
                continue;
            }
#endif
            for (k = w.c0; k < w.c0 + w.cn; ++k) {
                int wide = *e->wide && FN(wide)(m, a, b, c, k);
                if (!mk) { /* one run */
                    FN(dx_run)(BN_AT(dy, dys, o, k, w.i0), dys, x ? BN_AT(x, xs, o, k, w.i0) : x,
                               xs, BN_AT(dx, dxs, o, k, w.i0), dxs, w.len, m, a, b, c, e, k,
                               wide, 1);
                } else {
                    FN(masked_dx_row)(&w, dy, dys, x, xs, dx, dxs, o, k, m, a, b, c, e, mk,
                                      wide);
                }
            }
        }
        FN(stream_fence)(e->stream);
        return;
    }
    if (!mk && !*e->wide && FN(flat_rows)(t, s, dys, e->stream) &&
        FN(flat_rows)(t, s, dxs, e->stream) && (!b || FN(flat_rows)(t, s, xs, e->stream))) {
        ptrdiff_t n = w.rows * s.channels;
        const BN_T *g = BN_AT(dy, dys, w.o0, 0, 0);
        BN_T *d = BN_AT(dx, dxs, w.o0, 0, 0);
        if (b)
            FN(elementwise)(BN_OP_DX, BN_COEFS_WRAPPED, n, s.channels, 0,
                            BN_AT(x, xs, w.o0, 0, 0), 1, g, 1, NULL, 0, 0, NULL, d, 1, m, a, b,
                            c, BN_STREAM_RUN(e, d, n), 0);
        else
            FN(elementwise)(BN_OP_SCALE, BN_COEFS_WRAPPED, n, s.channels, 0, NULL, 0, g, 1, NULL,
                            0, 0, NULL, d, 1, NULL, a, NULL, NULL, BN_STREAM_RUN(e, d, n), 0);
        FN(stream_fence)(e->stream);
        return;
    }
    for (j = 0; j < w.cn; j = end) {
        int wide = *e->wide && FN(wide)(m, a, b, c, w.c0 + j);
        end = *e->wide ? FN(same_kind_end)(m, a, b, c, w.c0, j, w.cn) : w.cn;
        if (!wide && BN_ALIGNS_RUN(end - j))
            FN(dx_rows)(&w, w.c0 + j, end - j, 0, 1, dy, dys, x, xs, dx, dxs, m, a, b, c, e, mk);
        else
            FN(dx_rows)(&w, w.c0 + j, end - j, wide, 0, dy, dys, x, xs, dx, dxs, m, a, b, c, e,
                        mk);
    }
    FN(stream_fence)(e->stream);
}

/* The relu's gradient gate: dz = dy where y <= 0 is false (y > 0, or NaN: PyTorch's
 * threshold_backward), else +0. A selection on the bits, no arithmetic: the same bits on
 * every ISA, and branchless, so that it vectorises (the signs of y are random: a branch
 * per element mispredicted half the time and made the backward 10x slower). */
#if BN_KIND == BN_KIND_F64
#define BN_BITS uint64_t
#define BN_GATE_PASSES(p) ((BN_BITS)!(*(p) <= 0))
#elif BN_KIND == BN_KIND_F32
#define BN_BITS uint32_t
#define BN_GATE_PASSES(p) ((BN_BITS)!(*(p) <= 0))
#else /* 16-bit patterns: positive and nonzero, or NaN (beyond the infinity's pattern) */
#define BN_BITS uint16_t
#define BN_GATE_INF (BN_KIND == BN_KIND_F16 ? 0x7c00 : 0x7f80)
#define BN_GATE_PASSES(p)                                                                     \
    ((BN_BITS)((((*(p) & 0x8000) == 0) & ((*(p) & 0x7fff) != 0)) | ((*(p) & 0x7fff) > BN_GATE_INF)))
#endif
static inline void FN(run_gate)(const BN_T *dy, ptrdiff_t dyst, const BN_T *y, ptrdiff_t yst,
                                BN_T *dz, ptrdiff_t dzst, ptrdiff_t n)
{
    ptrdiff_t i;
    BN_BITS b;
    if (dyst == 1 && yst == 1 && dzst == 1) {
        for (i = 0; i < n; ++i) {
            memcpy(&b, dy + i, sizeof b);
            b &= (BN_BITS)0 - BN_GATE_PASSES(y + i);
            memcpy(dz + i, &b, sizeof b);
        }
        return;
    }
    for (i = 0; i < n; ++i) {
        memcpy(&b, dy + i * dyst, sizeof b);
        b &= (BN_BITS)0 - BN_GATE_PASSES(y + i * yst);
        memcpy(dz + i * dzst, &b, sizeof b);
    }
}
#undef BN_BITS
#undef BN_GATE_PASSES
#undef BN_GATE_INF

static inline void FN(gate_unit)(const bn_tiling *t, bn_shape s, const BN_T *dy, bn_strides dys,
                                 const BN_T *y, bn_strides ys, BN_T *dz, bn_strides dzs,
                                 ptrdiff_t u)
{
    bn_unit w = bn_unit_at(t, s, u);
    ptrdiff_t o, c;
    for (o = w.o0; o < w.o0 + w.rows; ++o) {
        if (!t->planar) {
            FN(run_gate)(BN_AT(dy, dys, o, w.c0, 0), dys.channel, BN_AT(y, ys, o, w.c0, 0),
                         ys.channel, BN_AT(dz, dzs, o, w.c0, 0), dzs.channel, w.cn);
            continue;
        }
        for (c = w.c0; c < w.c0 + w.cn; ++c)
            FN(run_gate)(BN_AT(dy, dys, o, c, w.i0), dys.inner, BN_AT(y, ys, o, c, w.i0),
                         ys.inner, BN_AT(dz, dzs, o, c, w.i0), dzs.inner, w.len);
    }
}
