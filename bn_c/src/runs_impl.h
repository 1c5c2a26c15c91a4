/* Innermost loops for the element type chosen by BN_KIND (see eltype.h). Included by each
 * kernel family once per element type; no include guard on purpose.
 *
 * "run" loops walk n elements of one channel (stride st) and reduce them to scalars.
 * "cols" loops walk a row across cn channels (stride st); "rows" variants walk many rows.
 * Accumulation is in double; the results depend only on the data, never on the threads.
 * With SIMD (AVX2+FMA) the reductions use 4-lane double vectors with independent
 * accumulators and the elementwise loops native-width vectors of the compute type. */
#include "eltype.h"

#define FN(name) BN_CAT2(name, BN_TN)

#if BN_SIMD && !defined(BN_HSUM4_DEFINED)
#define BN_HSUM4_DEFINED
/* (v0 + v2) + (v1 + v3): a fixed order, so results are reproducible */
static inline double bn_hsum4(__m256d v)
{
    __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
    __m128d s = _mm_add_pd(lo, hi);
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#endif

/* Reductions over a plane: `rows` runs of n elements (element stride st, row stride rs) of
 * one channel. Vector accumulators live across all the rows and are reduced once at the end,
 * so short runs (small images) cost no per-row horizontal sums. */

/* sum of d and of d*d, d = x - m */
static inline void FN(run_dev)(const BN_T *x, ptrdiff_t rs, ptrdiff_t rows, ptrdiff_t n,
                               ptrdiff_t st, double m, double *sd, double *sdd)
{
    double d0 = 0, d1 = 0, q0 = 0, q1 = 0;
    ptrdiff_t r, i;
#if BN_SIMD
    __m256d vm = _mm256_set1_pd(m), s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    __m256d p0 = s0, p1 = s0, p2 = s0, p3 = s0;
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *p = x + r * rs;
        i = 0;
        if (st == 1) {
#if BN_SIMD
            for (; i + 16 <= n; i += 16) {
                __m256d e0 = _mm256_sub_pd(BN_LOAD4D(p + i), vm);
                __m256d e1 = _mm256_sub_pd(BN_LOAD4D(p + i + 4), vm);
                __m256d e2 = _mm256_sub_pd(BN_LOAD4D(p + i + 8), vm);
                __m256d e3 = _mm256_sub_pd(BN_LOAD4D(p + i + 12), vm);
                s0 = _mm256_add_pd(s0, e0), p0 = _mm256_fmadd_pd(e0, e0, p0);
                s1 = _mm256_add_pd(s1, e1), p1 = _mm256_fmadd_pd(e1, e1, p1);
                s2 = _mm256_add_pd(s2, e2), p2 = _mm256_fmadd_pd(e2, e2, p2);
                s3 = _mm256_add_pd(s3, e3), p3 = _mm256_fmadd_pd(e3, e3, p3);
            }
            for (; i + 4 <= n; i += 4) {
                __m256d e0 = _mm256_sub_pd(BN_LOAD4D(p + i), vm);
                s0 = _mm256_add_pd(s0, e0), p0 = _mm256_fmadd_pd(e0, e0, p0);
            }
#endif
            for (; i + 2 <= n; i += 2) {
                double e0 = (double)BN_LD(p + i) - m, e1 = (double)BN_LD(p + i + 1) - m;
                d0 += e0, d1 += e1, q0 += e0 * e0, q1 += e1 * e1;
            }
            for (; i < n; ++i) {
                double e = (double)BN_LD(p + i) - m;
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
    d0 += bn_hsum4(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
    q0 += bn_hsum4(_mm256_add_pd(_mm256_add_pd(p0, p1), _mm256_add_pd(p2, p3)));
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
    __m256d vm = _mm256_set1_pd(m), g0 = _mm256_setzero_pd(), g1 = g0, g2 = g0, g3 = g0;
    __m256d h0 = g0, h1 = g0, h2 = g0, h3 = g0;
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *pg = dy + r * dyrs, *px = x + r * xrs;
        i = 0;
        if (dyst == 1 && xst == 1) {
#if BN_SIMD
            for (; i + 16 <= n; i += 16) {
                __m256d a = BN_LOAD4D(pg + i), b = BN_LOAD4D(pg + i + 4);
                __m256d c = BN_LOAD4D(pg + i + 8), d = BN_LOAD4D(pg + i + 12);
                g0 = _mm256_add_pd(g0, a), g1 = _mm256_add_pd(g1, b);
                g2 = _mm256_add_pd(g2, c), g3 = _mm256_add_pd(g3, d);
                h0 = _mm256_fmadd_pd(a, _mm256_sub_pd(BN_LOAD4D(px + i), vm), h0);
                h1 = _mm256_fmadd_pd(b, _mm256_sub_pd(BN_LOAD4D(px + i + 4), vm), h1);
                h2 = _mm256_fmadd_pd(c, _mm256_sub_pd(BN_LOAD4D(px + i + 8), vm), h2);
                h3 = _mm256_fmadd_pd(d, _mm256_sub_pd(BN_LOAD4D(px + i + 12), vm), h3);
            }
            for (; i + 4 <= n; i += 4) {
                __m256d a = BN_LOAD4D(pg + i);
                g0 = _mm256_add_pd(g0, a);
                h0 = _mm256_fmadd_pd(a, _mm256_sub_pd(BN_LOAD4D(px + i), vm), h0);
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
    s0 += bn_hsum4(_mm256_add_pd(_mm256_add_pd(g0, g1), _mm256_add_pd(g2, g3)));
    p0 += bn_hsum4(_mm256_add_pd(_mm256_add_pd(h0, h1), _mm256_add_pd(h2, h3)));
#endif
    *sdy += s0 + s1;
    *sdyx += p0 + p1;
}

/* y = (x - m) * a + b. In place (y == x) is fine: each vector is read before it is written. */
static inline void FN(run_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                  ptrdiff_t n, BN_CT m, BN_CT a, BN_CT b, int stream)
{
    ptrdiff_t i = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (xst == 1 && yst == 1) {
#if BN_SIMD
        BN_V vm = BN_VSET1(m), va = BN_VSET1(a), vb = BN_VSET1(b);
        stream = stream && BN_CAN_STREAM;
        for (; stream && i < n && BN_MISALIGNED(y + i); ++i)
            BN_ST(y + i, BN_SFMA(BN_LD(x + i) - m, a, b));
        for (; i + 2 * BN_W <= n; i += 2 * BN_W) {
            BN_V y0 = BN_VFMA(BN_VSUB(BN_VLD(x + i), vm), va, vb);
            BN_V y1 = BN_VFMA(BN_VSUB(BN_VLD(x + i + BN_W), vm), va, vb);
            BN_VSTS(stream, y + i, y0), BN_VSTS(stream, y + i + BN_W, y1);
        }
        for (; i + BN_W <= n; i += BN_W)
            BN_VSTS(stream, y + i, BN_VFMA(BN_VSUB(BN_VLD(x + i), vm), va, vb));
        for (; i < n; ++i) BN_ST(y + i, BN_SFMA(BN_LD(x + i) - m, a, b));
#endif
        for (; i < n; ++i) BN_ST(y + i, (BN_LD(x + i) - m) * a + b);
    } else {
        for (; i < n; ++i) BN_ST(y + i * yst, (BN_LD(x + i * xst) - m) * a + b);
    }
}

/* dx = a * dy + (b * (x - m) + c) */
static inline void FN(run_bwd_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                  BN_T *dx, ptrdiff_t dxst, ptrdiff_t n, BN_CT m, BN_CT a,
                                  BN_CT b, BN_CT c, int stream)
{
    ptrdiff_t i = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (dyst == 1 && xst == 1 && dxst == 1) {
#if BN_SIMD
        BN_V vm = BN_VSET1(m), va = BN_VSET1(a), vb = BN_VSET1(b), vc = BN_VSET1(c);
        stream = stream && BN_CAN_STREAM;
        for (; stream && i < n && BN_MISALIGNED(dx + i); ++i)
            BN_ST(dx + i, BN_SFMA(a, BN_LD(dy + i), BN_SFMA(BN_LD(x + i) - m, b, c)));
        for (; i + BN_W <= n; i += BN_W)
            BN_VSTS(stream, dx + i,
                    BN_VFMA(va, BN_VLD(dy + i), BN_VFMA(BN_VSUB(BN_VLD(x + i), vm), vb, vc)));
        for (; i < n; ++i)
            BN_ST(dx + i, BN_SFMA(a, BN_LD(dy + i), BN_SFMA(BN_LD(x + i) - m, b, c)));
#endif
        for (; i < n; ++i) BN_ST(dx + i, a * BN_LD(dy + i) + ((BN_LD(x + i) - m) * b + c));
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
#endif
        for (; i < n; ++i) BN_ST(dx + i, a * BN_LD(dy + i));
    } else {
        for (; i < n; ++i) BN_ST(dx + i * dxst, a * BN_LD(dy + i * dyst));
    }
}

/* Fill the wrap-around of `arrays` coefficient arrays (see BN_COEF_STRIDE). */
static inline void FN(wrap_coefficients)(BN_CT *coef, int arrays, ptrdiff_t C)
{
    ptrdiff_t CS = BN_COEF_STRIDE(C), k;
    int j;
    for (j = 0; j < arrays; ++j)
        for (k = C; k < CS; ++k) coef[j * CS + k] = coef[j * CS + k % C];
}

/* Channels-last data whose rows are back to back (row stride C) is one flat run of n values
 * starting at channel 0: element i belongs to channel i mod C. Taken as such, the run's
 * vectors may straddle rows (the coefficients are read from the wrapped arrays), short rows
 * cost no per-row overhead, and a streamed output has a single unaligned head. Same values as
 * cols_affine / cols_bwd_dx / cols_scale row by row. */
#define BN_NEXT_CHANNEL(c, step, C) ((c) = bn_next_channel((c), (step), (C)))

static inline void FN(flat_affine)(const BN_T *x, BN_T *y, ptrdiff_t n, ptrdiff_t C,
                                   const BN_CT *m, const BN_CT *a, const BN_CT *b, int stream)
{
    ptrdiff_t i = 0, c = 0;
    (void)stream;
#if BN_SIMD
    stream = stream && BN_CAN_STREAM;
    for (; stream && i < n && BN_MISALIGNED(y + i); ++i, BN_NEXT_CHANNEL(c, 1, C))
        BN_ST(y + i, BN_SFMA(BN_LD(x + i) - m[c], a[c], b[c]));
    for (; i + BN_W <= n; i += BN_W, BN_NEXT_CHANNEL(c, BN_W, C))
        BN_VSTS(stream, y + i,
                BN_VFMA(BN_VSUB(BN_VLD(x + i), BN_VLDC(m + c)), BN_VLDC(a + c), BN_VLDC(b + c)));
    for (; i < n; ++i, BN_NEXT_CHANNEL(c, 1, C))
        BN_ST(y + i, BN_SFMA(BN_LD(x + i) - m[c], a[c], b[c]));
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(c, 1, C)) BN_ST(y + i, (BN_LD(x + i) - m[c]) * a[c] + b[c]);
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
#endif
    for (; i < n; ++i, BN_NEXT_CHANNEL(k, 1, C)) BN_ST(dx + i, a[k] * BN_LD(dy + i));
}

/* The exact path of a wide channel c (see bn_call in internal.h), element by element. */
static void FN(run_exact_y)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst, ptrdiff_t n,
                            const bn_call *e, ptrdiff_t c)
{
    ptrdiff_t i;
    for (i = 0; i < n; ++i)
        BN_ST(y + i * yst, (BN_CT)bn_exact_y(e, c, (double)BN_LD(x + i * xst)));
}

static void FN(run_exact_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                             BN_T *dx, ptrdiff_t dxst, ptrdiff_t n, const bn_call *e,
                             ptrdiff_t c)
{
    ptrdiff_t i;
    for (i = 0; i < n; ++i)
        BN_ST(dx + i * dxst, (BN_CT)bn_exact_dx(e, c, (double)BN_LD(dy + i * dyst),
                                                x ? (double)BN_LD(x + i * xst) : 0.0));
}

/* y[j] = (x[j] - m[j]) * a[j] + b[j] */
static inline void FN(cols_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                   ptrdiff_t cn, const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                   int stream)
{
    ptrdiff_t j = 0;
    (void)stream; /* non-temporal stores need SIMD */
    if (xst == 1 && yst == 1) {
#if BN_SIMD
        stream = stream && BN_CAN_STREAM;
        for (; stream && j < cn && BN_MISALIGNED(y + j); ++j)
            BN_ST(y + j, BN_SFMA(BN_LD(x + j) - m[j], a[j], b[j]));
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTS(stream, y + j, BN_VFMA(BN_VSUB(BN_VLD(x + j), BN_VLDC(m + j)), BN_VLDC(a + j),
                                           BN_VLDC(b + j)));
        for (; j < cn; ++j) BN_ST(y + j, BN_SFMA(BN_LD(x + j) - m[j], a[j], b[j]));
#endif
        for (; j < cn; ++j) BN_ST(y + j, (BN_LD(x + j) - m[j]) * a[j] + b[j]);
    } else {
        for (; j < cn; ++j) BN_ST(y + j * yst, (BN_LD(x + j * xst) - m[j]) * a[j] + b[j]);
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
            __m256d m0 = _mm256_loadu_pd(m + j), m1 = _mm256_loadu_pd(m + j + 4);
            __m256d m2 = _mm256_loadu_pd(m + j + 8), m3 = _mm256_loadu_pd(m + j + 12);
            __m256d s0 = _mm256_loadu_pd(sd + j), s1 = _mm256_loadu_pd(sd + j + 4);
            __m256d s2 = _mm256_loadu_pd(sd + j + 8), s3 = _mm256_loadu_pd(sd + j + 12);
            __m256d q0 = _mm256_loadu_pd(sdd + j), q1 = _mm256_loadu_pd(sdd + j + 4);
            __m256d q2 = _mm256_loadu_pd(sdd + j + 8), q3 = _mm256_loadu_pd(sdd + j + 12);
            for (r = r0; r < r1; ++r) {
                const BN_T *p = x + r * rs + j;
                __m256d e0 = _mm256_sub_pd(BN_LOAD4D(p), m0);
                __m256d e1 = _mm256_sub_pd(BN_LOAD4D(p + 4), m1);
                __m256d e2 = _mm256_sub_pd(BN_LOAD4D(p + 8), m2);
                __m256d e3 = _mm256_sub_pd(BN_LOAD4D(p + 12), m3);
                s0 = _mm256_add_pd(s0, e0), q0 = _mm256_fmadd_pd(e0, e0, q0);
                s1 = _mm256_add_pd(s1, e1), q1 = _mm256_fmadd_pd(e1, e1, q1);
                s2 = _mm256_add_pd(s2, e2), q2 = _mm256_fmadd_pd(e2, e2, q2);
                s3 = _mm256_add_pd(s3, e3), q3 = _mm256_fmadd_pd(e3, e3, q3);
            }
            _mm256_storeu_pd(sd + j, s0), _mm256_storeu_pd(sd + j + 4, s1);
            _mm256_storeu_pd(sd + j + 8, s2), _mm256_storeu_pd(sd + j + 12, s3);
            _mm256_storeu_pd(sdd + j, q0), _mm256_storeu_pd(sdd + j + 4, q1);
            _mm256_storeu_pd(sdd + j + 8, q2), _mm256_storeu_pd(sdd + j + 12, q3);
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
            __m256d m0 = _mm256_loadu_pd(m + j), m1 = _mm256_loadu_pd(m + j + 4);
            __m256d m2 = _mm256_loadu_pd(m + j + 8), m3 = _mm256_loadu_pd(m + j + 12);
            __m256d g0 = _mm256_loadu_pd(sdy + j), g1 = _mm256_loadu_pd(sdy + j + 4);
            __m256d g2 = _mm256_loadu_pd(sdy + j + 8), g3 = _mm256_loadu_pd(sdy + j + 12);
            __m256d h0 = _mm256_loadu_pd(sdyx + j), h1 = _mm256_loadu_pd(sdyx + j + 4);
            __m256d h2 = _mm256_loadu_pd(sdyx + j + 8), h3 = _mm256_loadu_pd(sdyx + j + 12);
            for (r = r0; r < r1; ++r) {
                const BN_T *pg = dy + r * dyrs + j, *px = x + r * xrs + j;
                __m256d a0 = BN_LOAD4D(pg), a1 = BN_LOAD4D(pg + 4);
                __m256d a2 = BN_LOAD4D(pg + 8), a3 = BN_LOAD4D(pg + 12);
                g0 = _mm256_add_pd(g0, a0), g1 = _mm256_add_pd(g1, a1);
                g2 = _mm256_add_pd(g2, a2), g3 = _mm256_add_pd(g3, a3);
                h0 = _mm256_fmadd_pd(a0, _mm256_sub_pd(BN_LOAD4D(px), m0), h0);
                h1 = _mm256_fmadd_pd(a1, _mm256_sub_pd(BN_LOAD4D(px + 4), m1), h1);
                h2 = _mm256_fmadd_pd(a2, _mm256_sub_pd(BN_LOAD4D(px + 8), m2), h2);
                h3 = _mm256_fmadd_pd(a3, _mm256_sub_pd(BN_LOAD4D(px + 12), m3), h3);
            }
            _mm256_storeu_pd(sdy + j, g0), _mm256_storeu_pd(sdy + j + 4, g1);
            _mm256_storeu_pd(sdy + j + 8, g2), _mm256_storeu_pd(sdy + j + 12, g3);
            _mm256_storeu_pd(sdyx + j, h0), _mm256_storeu_pd(sdyx + j + 4, h1);
            _mm256_storeu_pd(sdyx + j + 8, h2), _mm256_storeu_pd(sdyx + j + 12, h3);
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
