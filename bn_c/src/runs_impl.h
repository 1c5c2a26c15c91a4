/* Innermost loops for the element type chosen by BN_KIND (see eltype.h). Included by each
 * kernel family once per element type; no include guard on purpose.
 *
 * "run" loops walk n elements of one channel (stride st) and reduce them to scalars.
 * "cols" loops walk a row across cn channels (stride st); "rows" variants walk many rows.
 * Accumulation is in double; the results depend only on the data, never on the threads.
 * With SIMD the reductions use sixteen double accumulators (bn_d16) and the elementwise loops
 * native-width vectors of the compute type (512 bits for float32/float64 with AVX-512, with
 * masked tails). AVX2 and AVX-512 give the same bits: the lanes do the same arithmetic. */
#include "eltype.h"

#define FN(name) BN_CAT2(name, BN_TN)

/* Reductions over a plane: `rows` runs of n elements (element stride st, row stride rs) of
 * one channel. Vector accumulators live across all the rows and are reduced once at the end,
 * so short runs (small images) cost no per-row horizontal sums. */

/* sum of d and of d*d, d = x - m, over the values whose mask byte (row stride mrs, element
 * stride 1; NULL: all values) is set; with a mask, st must be 1. The same lanes and order
 * with or without one: an all-true mask gives the unmasked bits. */
BN_ALWAYS_INLINE void FN(run_dev)(const BN_T *x, ptrdiff_t rs, ptrdiff_t rows, ptrdiff_t n,
                                  ptrdiff_t st, double m, double *sd, double *sdd,
                                  const unsigned char *mk, ptrdiff_t mrs)
{
    double d0 = 0, d1 = 0, q0 = 0, q1 = 0;
    ptrdiff_t r, i;
#if BN_SIMD
    bn_d4 vm4 = bn_d4_set1(m);
    bn_d16 vm = bn_d16_set1(m), vs = bn_d16_set1(0.0), vq = vs;
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *p = x + r * rs;
        const unsigned char *mr = mk ? mk + r * mrs : mk;
        i = 0;
        if (st == 1) {
#if BN_SIMD
            for (; i + 16 <= n; i += 16) {
                bn_d16 e = bn_d16_sub(BN_LOAD16D(p + i), vm);
                if (mk) e = bn_d16_keep(e, mr + i);
                vs = bn_d16_add(vs, e), vq = bn_d16_fma(e, e, vq);
            }
            for (; i + 4 <= n; i += 4) {
                bn_d4 e0 = bn_d4_sub(BN_LOAD4D(p + i), vm4);
                if (mk) e0 = bn_d4_keep(e0, mr + i);
                vs = bn_d16_add4(vs, e0), vq = bn_d16_fma4(vq, e0, e0);
            }
#endif
            for (; i + 2 <= n; i += 2) {
                double e0 = (double)BN_LD(p + i) - m, e1 = (double)BN_LD(p + i + 1) - m;
                if (mk) e0 = mr[i] ? e0 : 0.0, e1 = mr[i + 1] ? e1 : 0.0;
                d0 += e0, d1 += e1, q0 += e0 * e0, q1 += e1 * e1;
            }
            for (; i < n; ++i) {
                double e = (double)BN_LD(p + i) - m;
                if (mk) e = mr[i] ? e : 0.0;
                d0 += e, q0 += e * e;
            }
        } else {
            for (; i < n; ++i) {
                double e = (double)BN_LD(p + i * st) - m;
                d0 += e, q0 += e * e;
            }
        }
    }
#if BN_SIMD
    d0 += bn_d16_hsum(vs);
    q0 += bn_d16_hsum(vq);
#endif
    *sd += d0 + d1;
    *sdd += q0 + q1;
}

/* sum of dy and of dy * (x - m) */
static inline void FN(run_bwd_sums)(const BN_T *dy, ptrdiff_t dyrs, ptrdiff_t dyst,
                                    const BN_T *x, ptrdiff_t xrs, ptrdiff_t xst, ptrdiff_t rows,
                                    ptrdiff_t n, double m, double *sdy, double *sdyx)
{
    double s0 = 0, s1 = 0, p0 = 0, p1 = 0;
    ptrdiff_t r, i;
#if BN_SIMD
    bn_d4 vm4 = bn_d4_set1(m);
    bn_d16 vm = bn_d16_set1(m), vg = bn_d16_set1(0.0), vh = vg;
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *pg = dy + r * dyrs, *px = x + r * xrs;
        i = 0;
        if (dyst == 1 && xst == 1) {
#if BN_SIMD
            for (; i + 16 <= n; i += 16) {
                bn_d16 a = BN_LOAD16D(pg + i);
                vg = bn_d16_add(vg, a);
                vh = bn_d16_fma(a, bn_d16_sub(BN_LOAD16D(px + i), vm), vh);
            }
            for (; i + 4 <= n; i += 4) {
                bn_d4 a = BN_LOAD4D(pg + i);
                vg = bn_d16_add4(vg, a);
                vh = bn_d16_fma4(vh, a, bn_d4_sub(BN_LOAD4D(px + i), vm4));
            }
#endif
            for (; i + 2 <= n; i += 2) {
                double a = (double)BN_LD(pg + i), b = (double)BN_LD(pg + i + 1);
                s0 += a, s1 += b;
                p0 += a * ((double)BN_LD(px + i) - m), p1 += b * ((double)BN_LD(px + i + 1) - m);
            }
            for (; i < n; ++i) {
                double a = (double)BN_LD(pg + i);
                s0 += a, p0 += a * ((double)BN_LD(px + i) - m);
            }
        } else {
            for (; i < n; ++i) {
                double a = (double)BN_LD(pg + i * dyst);
                s0 += a, p0 += a * ((double)BN_LD(px + i * xst) - m);
            }
        }
    }
#if BN_SIMD
    s0 += bn_d16_hsum(vg);
    p0 += bn_d16_hsum(vh);
#endif
    *sdy += s0 + s1;
    *sdyx += p0 + p1;
}

/* The forward's epilogue on one value (see bn_call): v + z (z NULL: none), then relu
 * (v < 0 gives 0; NaN stays NaN). The loops below take z and relu as arguments and are
 * inlined into callers that pass constants, so the plain loops carry none of it. */
static inline BN_CT FN(epi)(BN_CT v, const BN_T *z, int relu)
{
    if (z) v += BN_LD(z);
    if (relu) v = v < 0 ? (BN_CT)0 : v;
    return v;
}
#define BN_ZAT(z, i, st) ((z) ? (z) + (i) * (st) : (z))
#if BN_SIMD
/* max(0, v) returns v when v is NaN or -0, as the scalar relu does: the same bits */
static inline BN_V FN(vepi)(BN_V v, const BN_T *z, int relu)
{
    if (z) v = BN_VADD(v, BN_VLD(z));
    if (relu) v = BN_VMAX(BN_VSET1(0), v);
    return v;
}
#if BN_VMASK
static inline BN_V FN(vepi_n)(BN_V v, const BN_T *z, int relu, ptrdiff_t r)
{
    if (z) v = BN_VADD(v, BN_VLD_N(z, r));
    if (relu) v = BN_VMAX(BN_VSET1(0), v);
    return v;
}
#endif
#endif

/* y = epi((x - m) * a + b). In place (y == x, or y == z) is fine: each vector is read before
 * it is written. */
BN_ALWAYS_INLINE void FN(run_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                     ptrdiff_t n, BN_CT m, BN_CT a, BN_CT b, int stream,
                                     const BN_T *z, ptrdiff_t zst, int relu)
{
    ptrdiff_t i = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (xst == 1 && yst == 1 && (!z || zst == 1)) {
#if BN_SIMD
        BN_V vm = BN_VSET1(m), va = BN_VSET1(a), vb = BN_VSET1(b);
        stream = stream && BN_CAN_STREAM;
        for (; stream && i < n && BN_MISALIGNED(y + i); ++i)
            BN_ST(y + i, FN(epi)(BN_SFMA(BN_LD(x + i) - m, a, b), BN_ZAT(z, i, 1), relu));
        for (; i + 2 * BN_W <= n; i += 2 * BN_W) {
            BN_V y0 = FN(vepi)(BN_VFMA(BN_VSUB(BN_VLD(x + i), vm), va, vb), BN_ZAT(z, i, 1), relu);
            BN_V y1 = FN(vepi)(BN_VFMA(BN_VSUB(BN_VLD(x + i + BN_W), vm), va, vb),
                               BN_ZAT(z, i + BN_W, 1), relu);
            BN_VSTS(stream, y + i, y0), BN_VSTS(stream, y + i + BN_W, y1);
        }
        for (; i + BN_W <= n; i += BN_W)
            BN_VSTS(stream, y + i,
                    FN(vepi)(BN_VFMA(BN_VSUB(BN_VLD(x + i), vm), va, vb), BN_ZAT(z, i, 1), relu));
#if BN_VMASK
        if (i < n)
            BN_VST_N(y + i,
                     FN(vepi_n)(BN_VFMA(BN_VSUB(BN_VLD_N(x + i, n - i), vm), va, vb),
                                BN_ZAT(z, i, 1), relu, n - i),
                     n - i);
        i = n;
#endif
        for (; i < n; ++i)
            BN_ST(y + i, FN(epi)(BN_SFMA(BN_LD(x + i) - m, a, b), BN_ZAT(z, i, 1), relu));
#endif
        for (; i < n; ++i) BN_ST(y + i, FN(epi)((BN_LD(x + i) - m) * a + b, BN_ZAT(z, i, 1), relu));
    } else {
        for (; i < n; ++i)
            BN_ST(y + i * yst,
                  FN(epi)((BN_LD(x + i * xst) - m) * a + b, BN_ZAT(z, i, zst), relu));
    }
}

/* dx = a * dy + (b * (x - m) + c); with a mask (element stride 1, and contiguous arrays),
 * positions whose byte is 0 get a * dy + 0: their x is in no statistic. */
BN_ALWAYS_INLINE void FN(run_bwd_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x,
                                     ptrdiff_t xst, BN_T *dx, ptrdiff_t dxst, ptrdiff_t n,
                                     BN_CT m, BN_CT a, BN_CT b, BN_CT c, int stream,
                                     const unsigned char *mk)
{
    ptrdiff_t i = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (dyst == 1 && xst == 1 && dxst == 1) {
#if BN_SIMD
        BN_V vm = BN_VSET1(m), va = BN_VSET1(a), vb = BN_VSET1(b), vc = BN_VSET1(c);
        stream = stream && BN_CAN_STREAM;
        for (; stream && i < n && BN_MISALIGNED(dx + i); ++i) {
            BN_CT t = BN_SFMA(BN_LD(x + i) - m, b, c);
            BN_ST(dx + i, BN_SFMA(a, BN_LD(dy + i), mk && !mk[i] ? (BN_CT)0 : t));
        }
        for (; i + BN_W <= n; i += BN_W) {
            BN_V t = BN_VFMA(BN_VSUB(BN_VLD(x + i), vm), vb, vc);
            if (mk) t = FN(vkeep)(t, mk + i);
            BN_VSTS(stream, dx + i, BN_VFMA(va, BN_VLD(dy + i), t));
        }
#if BN_VMASK
        if (i < n) {
            BN_V t = BN_VFMA(BN_VSUB(BN_VLD_N(x + i, n - i), vm), vb, vc);
            if (mk) t = FN(vkeep_n)(t, mk + i, n - i);
            BN_VST_N(dx + i, BN_VFMA(va, BN_VLD_N(dy + i, n - i), t), n - i);
        }
        i = n;
#endif
        for (; i < n; ++i) {
            BN_CT t = BN_SFMA(BN_LD(x + i) - m, b, c);
            BN_ST(dx + i, BN_SFMA(a, BN_LD(dy + i), mk && !mk[i] ? (BN_CT)0 : t));
        }
#endif
        for (; i < n; ++i) {
            BN_CT t = (BN_LD(x + i) - m) * b + c;
            BN_ST(dx + i, a * BN_LD(dy + i) + (mk && !mk[i] ? (BN_CT)0 : t));
        }
    } else {
        for (; i < n; ++i)
            BN_ST(dx + i * dxst, a * BN_LD(dy + i * dyst) + ((BN_LD(x + i * xst) - m) * b + c));
    }
}

/* dx = a * dy */
static inline void FN(run_scale)(const BN_T *dy, ptrdiff_t dyst, BN_T *dx, ptrdiff_t dxst,
                                 ptrdiff_t n, BN_CT a, int stream)
{
    ptrdiff_t i = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (dyst == 1 && dxst == 1) {
#if BN_SIMD
        BN_V va = BN_VSET1(a);
        stream = stream && BN_CAN_STREAM;
        for (; stream && i < n && BN_MISALIGNED(dx + i); ++i) BN_ST(dx + i, a * BN_LD(dy + i));
        for (; i + BN_W <= n; i += BN_W) BN_VSTS(stream, dx + i, BN_VMUL(va, BN_VLD(dy + i)));
#if BN_VMASK
        if (i < n) BN_VST_N(dx + i, BN_VMUL(va, BN_VLD_N(dy + i, n - i)), n - i);
        i = n;
#endif
#endif
        for (; i < n; ++i) BN_ST(dx + i, a * BN_LD(dy + i));
    } else {
        for (; i < n; ++i) BN_ST(dx + i * dxst, a * BN_LD(dy + i * dyst));
    }
}

/* Fill the wrap-around of `arrays` coefficient arrays (see BN_COEF_STRIDE) that repeats
 * channels [c0, c0 + n). */
static inline void FN(wrap_channels)(BN_CT *coef, int arrays, ptrdiff_t C, ptrdiff_t c0,
                                     ptrdiff_t n)
{
    ptrdiff_t CS = BN_COEF_STRIDE(C), c, k;
    int j;
    for (j = 0; j < arrays; ++j)
        for (c = c0; c < c0 + n; ++c)
            for (k = c + C; k < CS; k += C) coef[j * CS + k] = coef[j * CS + c];
}

/* Channels-last data whose rows are back to back (row stride C) is one flat run of n values
 * starting at channel 0: element i belongs to channel i mod C. Taken as such, the run's
 * vectors may straddle rows (the coefficients are read from the wrapped arrays), short rows
 * cost no per-row overhead, and a streamed output has a single unaligned head. Same values as
 * cols_affine / cols_bwd_dx / cols_scale row by row. */
#define BN_NEXT_CHANNEL(c, step, C) ((c) = bn_next_channel((c), (step), (C)))

BN_ALWAYS_INLINE void FN(flat_affine)(const BN_T *x, BN_T *y, ptrdiff_t n, ptrdiff_t C,
                                      const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                      int stream, const BN_T *z, int relu)
{
    ptrdiff_t i = 0, c = 0;
    (void)stream;
#if BN_SIMD
    stream = stream && BN_CAN_STREAM;
    for (; stream && i < n && BN_MISALIGNED(y + i); ++i, BN_NEXT_CHANNEL(c, 1, C))
        BN_ST(y + i, FN(epi)(BN_SFMA(BN_LD(x + i) - m[c], a[c], b[c]), BN_ZAT(z, i, 1), relu));
    for (; i + BN_W <= n; i += BN_W, BN_NEXT_CHANNEL(c, BN_W, C))
        BN_VSTS(stream, y + i,
                FN(vepi)(BN_VFMA(BN_VSUB(BN_VLD(x + i), BN_VLDC(m + c)), BN_VLDC(a + c),
                                 BN_VLDC(b + c)),
                         BN_ZAT(z, i, 1), relu));
#if BN_VMASK /* the wrapped coefficient arrays hold a whole vector from any channel */
    if (i < n)
        BN_VST_N(y + i,
                 FN(vepi_n)(BN_VFMA(BN_VSUB(BN_VLD_N(x + i, n - i), BN_VLDC(m + c)),
                                    BN_VLDC(a + c), BN_VLDC(b + c)),
                            BN_ZAT(z, i, 1), relu, n - i),
                 n - i);
    i = n;
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(c, 1, C))
        BN_ST(y + i, FN(epi)(BN_SFMA(BN_LD(x + i) - m[c], a[c], b[c]), BN_ZAT(z, i, 1), relu));
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(c, 1, C))
        BN_ST(y + i, FN(epi)((BN_LD(x + i) - m[c]) * a[c] + b[c], BN_ZAT(z, i, 1), relu));
}

static inline void FN(flat_bwd_dx)(const BN_T *dy, const BN_T *x, BN_T *dx, ptrdiff_t n,
                                   ptrdiff_t C, const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                   const BN_CT *c, int stream)
{
    ptrdiff_t i = 0, k = 0;
    (void)stream;
#if BN_SIMD
    stream = stream && BN_CAN_STREAM;
    for (; stream && i < n && BN_MISALIGNED(dx + i); ++i, BN_NEXT_CHANNEL(k, 1, C))
        BN_ST(dx + i, BN_SFMA(a[k], BN_LD(dy + i), BN_SFMA(BN_LD(x + i) - m[k], b[k], c[k])));
    for (; i + BN_W <= n; i += BN_W, BN_NEXT_CHANNEL(k, BN_W, C))
        BN_VSTS(stream, dx + i,
                BN_VFMA(BN_VLDC(a + k), BN_VLD(dy + i),
                        BN_VFMA(BN_VSUB(BN_VLD(x + i), BN_VLDC(m + k)), BN_VLDC(b + k),
                                BN_VLDC(c + k))));
#if BN_VMASK
    if (i < n)
        BN_VST_N(dx + i,
                 BN_VFMA(BN_VLDC(a + k), BN_VLD_N(dy + i, n - i),
                         BN_VFMA(BN_VSUB(BN_VLD_N(x + i, n - i), BN_VLDC(m + k)), BN_VLDC(b + k),
                                 BN_VLDC(c + k))),
                 n - i);
    i = n;
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(k, 1, C))
        BN_ST(dx + i, BN_SFMA(a[k], BN_LD(dy + i), BN_SFMA(BN_LD(x + i) - m[k], b[k], c[k])));
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(k, 1, C))
        BN_ST(dx + i, a[k] * BN_LD(dy + i) + ((BN_LD(x + i) - m[k]) * b[k] + c[k]));
}

static inline void FN(flat_scale)(const BN_T *dy, BN_T *dx, ptrdiff_t n, ptrdiff_t C,
                                  const BN_CT *a, int stream)
{
    ptrdiff_t i = 0, k = 0;
    (void)stream;
#if BN_SIMD
    stream = stream && BN_CAN_STREAM;
    for (; stream && i < n && BN_MISALIGNED(dx + i); ++i, BN_NEXT_CHANNEL(k, 1, C))
        BN_ST(dx + i, a[k] * BN_LD(dy + i));
    for (; i + BN_W <= n; i += BN_W, BN_NEXT_CHANNEL(k, BN_W, C))
        BN_VSTS(stream, dx + i, BN_VMUL(BN_VLDC(a + k), BN_VLD(dy + i)));
#if BN_VMASK
    if (i < n) BN_VST_N(dx + i, BN_VMUL(BN_VLDC(a + k), BN_VLD_N(dy + i, n - i)), n - i);
    i = n;
#endif
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(k, 1, C)) BN_ST(dx + i, a[k] * BN_LD(dy + i));
}

/* The exact path of a wide channel c (see bn_call in internal.h), element by element. */
static void FN(run_exact_y)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst, ptrdiff_t n,
                            const bn_call *e, ptrdiff_t c, const BN_T *z, ptrdiff_t zst)
{
    ptrdiff_t i;
    for (i = 0; i < n; ++i) {
        double v = bn_exact_y(e, c, (double)BN_LD(x + i * xst));
        BN_CT r;
        if (z) v += (double)BN_LD(z + i * zst);
        r = (BN_CT)v; /* the relu on the compute type, as the vector loops: -0.0 stays */
        BN_ST(y + i * yst, e->relu && r < 0 ? (BN_CT)0 : r);
    }
}

static void FN(run_exact_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                             BN_T *dx, ptrdiff_t dxst, ptrdiff_t n, const bn_call *e,
                             ptrdiff_t c, int trained)
{
    ptrdiff_t i;
    for (i = 0; i < n; ++i)
        BN_ST(dx + i * dxst, (BN_CT)bn_exact_dx(e, c, (double)BN_LD(dy + i * dyst),
                                                x ? (double)BN_LD(x + i * xst) : 0.0, trained));
}

/* y[j] = epi((x[j] - m[j]) * a[j] + b[j]) */
BN_ALWAYS_INLINE void FN(cols_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                      ptrdiff_t cn, const BN_CT *m, const BN_CT *a,
                                      const BN_CT *b, int stream, const BN_T *z, ptrdiff_t zst,
                                      int relu)
{
    ptrdiff_t j = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (xst == 1 && yst == 1 && (!z || zst == 1)) {
#if BN_SIMD
        stream = stream && BN_CAN_STREAM;
        for (; stream && j < cn && BN_MISALIGNED(y + j); ++j)
            BN_ST(y + j, FN(epi)(BN_SFMA(BN_LD(x + j) - m[j], a[j], b[j]), BN_ZAT(z, j, 1), relu));
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTS(stream, y + j,
                    FN(vepi)(BN_VFMA(BN_VSUB(BN_VLD(x + j), BN_VLDC(m + j)), BN_VLDC(a + j),
                                     BN_VLDC(b + j)),
                             BN_ZAT(z, j, 1), relu));
#if BN_VMASK
        if (j < cn) {
            ptrdiff_t r = cn - j;
            BN_VST_N(y + j,
                     FN(vepi_n)(BN_VFMA(BN_VSUB(BN_VLD_N(x + j, r), BN_VLD_N(m + j, r)),
                                        BN_VLD_N(a + j, r), BN_VLD_N(b + j, r)),
                                BN_ZAT(z, j, 1), relu, r),
                     r);
        }
        j = cn;
#endif
        for (; j < cn; ++j)
            BN_ST(y + j, FN(epi)(BN_SFMA(BN_LD(x + j) - m[j], a[j], b[j]), BN_ZAT(z, j, 1), relu));
#endif
        for (; j < cn; ++j)
            BN_ST(y + j, FN(epi)((BN_LD(x + j) - m[j]) * a[j] + b[j], BN_ZAT(z, j, 1), relu));
    } else {
        for (; j < cn; ++j)
            BN_ST(y + j * yst,
                  FN(epi)((BN_LD(x + j * xst) - m[j]) * a[j] + b[j], BN_ZAT(z, j, zst), relu));
    }
}

/* dx[j] = a[j] * dy[j] + (b[j] * (x[j] - m[j]) + c[j]) */
static inline void FN(cols_bwd_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                   BN_T *dx, ptrdiff_t dxst, ptrdiff_t cn, const BN_CT *m,
                                   const BN_CT *a, const BN_CT *b, const BN_CT *c, int stream)
{
    ptrdiff_t j = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (dyst == 1 && xst == 1 && dxst == 1) {
#if BN_SIMD
        stream = stream && BN_CAN_STREAM;
        for (; stream && j < cn && BN_MISALIGNED(dx + j); ++j)
            BN_ST(dx + j, BN_SFMA(a[j], BN_LD(dy + j), BN_SFMA(BN_LD(x + j) - m[j], b[j], c[j])));
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTS(stream, dx + j, BN_VFMA(BN_VLDC(a + j), BN_VLD(dy + j),
                                            BN_VFMA(BN_VSUB(BN_VLD(x + j), BN_VLDC(m + j)),
                                                    BN_VLDC(b + j), BN_VLDC(c + j))));
#if BN_VMASK
        if (j < cn) {
            ptrdiff_t r = cn - j;
            BN_VST_N(dx + j, BN_VFMA(BN_VLD_N(a + j, r), BN_VLD_N(dy + j, r),
                                     BN_VFMA(BN_VSUB(BN_VLD_N(x + j, r), BN_VLD_N(m + j, r)),
                                             BN_VLD_N(b + j, r), BN_VLD_N(c + j, r))), r);
        }
        j = cn;
#endif
        for (; j < cn; ++j)
            BN_ST(dx + j, BN_SFMA(a[j], BN_LD(dy + j), BN_SFMA(BN_LD(x + j) - m[j], b[j], c[j])));
#endif
        for (; j < cn; ++j)
            BN_ST(dx + j, a[j] * BN_LD(dy + j) + ((BN_LD(x + j) - m[j]) * b[j] + c[j]));
    } else {
        for (; j < cn; ++j)
            BN_ST(dx + j * dxst,
                  a[j] * BN_LD(dy + j * dyst) + ((BN_LD(x + j * xst) - m[j]) * b[j] + c[j]));
    }
}

/* dx[j] = a[j] * dy[j] */
static inline void FN(cols_scale)(const BN_T *dy, ptrdiff_t dyst, BN_T *dx, ptrdiff_t dxst,
                                  ptrdiff_t cn, const BN_CT *a, int stream)
{
    ptrdiff_t j = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (dyst == 1 && dxst == 1) {
#if BN_SIMD
        stream = stream && BN_CAN_STREAM;
        for (; stream && j < cn && BN_MISALIGNED(dx + j); ++j) BN_ST(dx + j, a[j] * BN_LD(dy + j));
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTS(stream, dx + j, BN_VMUL(BN_VLDC(a + j), BN_VLD(dy + j)));
#if BN_VMASK
        if (j < cn) {
            ptrdiff_t r = cn - j;
            BN_VST_N(dx + j, BN_VMUL(BN_VLD_N(a + j, r), BN_VLD_N(dy + j, r)), r);
        }
        j = cn;
#endif
#endif
        for (; j < cn; ++j) BN_ST(dx + j, a[j] * BN_LD(dy + j));
    } else {
        for (; j < cn; ++j) BN_ST(dx + j * dxst, a[j] * BN_LD(dy + j * dyst));
    }
}

/* Reductions over `rows` rows (row stride rs) of cn channels (channel stride cst), one
 * accumulator per channel, rows in order. With SIMD, blocks of 16 contiguous channels keep
 * their accumulators in registers over BN_ROW_BLOCK rows, and the blocks go along the rows:
 * memory is read row by row, a few rows at a time, which the prefetchers follow (walking one
 * block down all the rows of a unit strides across pages and defeats them). The order per
 * channel is the same. */
#ifndef BN_ROW_BLOCK
#define BN_ROW_BLOCK 8
#endif

/* sd[j] += sum of d, sdd[j] += sum of d*d, d = x[r, j] - m[j] */
static inline void FN(cols_dev_rows)(const BN_T *x, ptrdiff_t rs, ptrdiff_t rows, ptrdiff_t cst,
                                     ptrdiff_t cn, const double *m, double *sd, double *sdd)
{
    ptrdiff_t j = 0, r;
#if BN_SIMD
    ptrdiff_t r0, r1;
    for (r0 = 0; cst == 1 && r0 < rows; r0 = r1) {
        r1 = r0 + BN_ROW_BLOCK < rows ? r0 + BN_ROW_BLOCK : rows;
        for (j = 0; j + 16 <= cn; j += 16) {
            bn_d16 vm = bn_d16_loadu(m + j), vs = bn_d16_loadu(sd + j), vq = bn_d16_loadu(sdd + j);
            for (r = r0; r < r1; ++r) {
                bn_d16 e = bn_d16_sub(BN_LOAD16D(x + r * rs + j), vm);
                vs = bn_d16_add(vs, e), vq = bn_d16_fma(e, e, vq);
            }
            bn_d16_storeu(sd + j, vs), bn_d16_storeu(sdd + j, vq);
        }
    }
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *p = x + r * rs;
        ptrdiff_t i;
        for (i = j; i < cn; ++i) {
            double e = (double)BN_LD(p + i * cst) - m[i];
            sd[i] += e, sdd[i] += e * e;
        }
    }
}

/* sdy[j] += sum of dy[r, j]; sdyx[j] += sum of dy[r, j] * (x[r, j] - m[j]) */
static inline void FN(cols_bwd_sums_rows)(const BN_T *dy, ptrdiff_t dyrs, ptrdiff_t dycst,
                                          const BN_T *x, ptrdiff_t xrs, ptrdiff_t xcst,
                                          ptrdiff_t rows, ptrdiff_t cn, const double *m,
                                          double *sdy, double *sdyx)
{
    ptrdiff_t j = 0, r;
#if BN_SIMD
    ptrdiff_t r0, r1;
    for (r0 = 0; dycst == 1 && xcst == 1 && r0 < rows; r0 = r1) {
        r1 = r0 + BN_ROW_BLOCK < rows ? r0 + BN_ROW_BLOCK : rows;
        for (j = 0; j + 16 <= cn; j += 16) {
            bn_d16 vm = bn_d16_loadu(m + j), vg = bn_d16_loadu(sdy + j), vh = bn_d16_loadu(sdyx + j);
            for (r = r0; r < r1; ++r) {
                bn_d16 a = BN_LOAD16D(dy + r * dyrs + j);
                vg = bn_d16_add(vg, a);
                vh = bn_d16_fma(a, bn_d16_sub(BN_LOAD16D(x + r * xrs + j), vm), vh);
            }
            bn_d16_storeu(sdy + j, vg), bn_d16_storeu(sdyx + j, vh);
        }
    }
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *pg = dy + r * dyrs, *px = x + r * xrs;
        ptrdiff_t i;
        for (i = j; i < cn; ++i) {
            double g = (double)BN_LD(pg + i * dycst);
            sdy[i] += g, sdyx[i] += g * ((double)BN_LD(px + i * xcst) - m[i]);
        }
    }
}
