/* Innermost loops over one run of elements, for element type BN_T (name BN_TN).
 * Included by each kernel family once per element type; no include guard on purpose.
 *
 * "run" loops walk n elements of one channel (stride st) and reduce them to scalars.
 * "cols" loops walk one row across cn channels (stride st) and update per-channel arrays.
 * Accumulation is in double; the results depend only on the data, never on the threads. */
#define FN(name) BN_CAT2(name, BN_TN)

/* With AVX2+FMA (the avx2 and avx512 builds) the reductions below use 4-lane double
 * vectors with several independent accumulators; elements are widened to double on load.
 * The elementwise loops are left to the compiler, which vectorizes them in those builds. */
#if defined(__AVX2__) && defined(__FMA__)
#define BN_SIMD_REDUCE 1
#include <immintrin.h>
#ifndef BN_HSUM4_DEFINED
#define BN_HSUM4_DEFINED
/* (v0 + v2) + (v1 + v3): a fixed order, so results are reproducible */
static inline double bn_hsum4(__m256d v)
{
    __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
    __m128d s = _mm_add_pd(lo, hi);
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#endif
#undef BN_LOAD4D
#if BN_IS_F32
#define BN_LOAD4D(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#else
#define BN_LOAD4D(p) _mm256_loadu_pd(p)
#endif
/* Native-width vectors of the element type, for the elementwise loops. */
#undef BN_V
#undef BN_W
#undef BN_VLOAD
#undef BN_VSTORE
#undef BN_VSET1
#undef BN_VSUB
#undef BN_VMUL
#undef BN_VFMA
#undef BN_SFMA
#if BN_IS_F32
#define BN_V __m256
#define BN_W 8
#define BN_VLOAD _mm256_loadu_ps
#define BN_VSTORE _mm256_storeu_ps
#define BN_VSET1 _mm256_set1_ps
#define BN_VSUB _mm256_sub_ps
#define BN_VMUL _mm256_mul_ps
#define BN_VFMA _mm256_fmadd_ps
#define BN_SFMA fmaf
#else
#define BN_V __m256d
#define BN_W 4
#define BN_VLOAD _mm256_loadu_pd
#define BN_VSTORE _mm256_storeu_pd
#define BN_VSET1 _mm256_set1_pd
#define BN_VSUB _mm256_sub_pd
#define BN_VMUL _mm256_mul_pd
#define BN_VFMA _mm256_fmadd_pd
#define BN_SFMA fma
#endif
#else
#define BN_SIMD_REDUCE 0
#endif

/* sum of x */
static inline double FN(run_sum)(const BN_T *x, ptrdiff_t n, ptrdiff_t st)
{
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    ptrdiff_t i = 0;
    if (st == 1) {
#if BN_SIMD_REDUCE
        __m256d v0 = _mm256_setzero_pd(), v1 = v0, v2 = v0, v3 = v0;
        for (; i + 16 <= n; i += 16) {
            v0 = _mm256_add_pd(v0, BN_LOAD4D(x + i));
            v1 = _mm256_add_pd(v1, BN_LOAD4D(x + i + 4));
            v2 = _mm256_add_pd(v2, BN_LOAD4D(x + i + 8));
            v3 = _mm256_add_pd(v3, BN_LOAD4D(x + i + 12));
        }
        for (; i + 4 <= n; i += 4) v0 = _mm256_add_pd(v0, BN_LOAD4D(x + i));
        a0 = bn_hsum4(_mm256_add_pd(_mm256_add_pd(v0, v1), _mm256_add_pd(v2, v3)));
#endif
        for (; i + 4 <= n; i += 4) {
            a0 += (double)x[i], a1 += (double)x[i + 1];
            a2 += (double)x[i + 2], a3 += (double)x[i + 3];
        }
        for (; i < n; ++i) a0 += (double)x[i];
    } else {
        for (; i < n; ++i) a0 += (double)x[i * st];
    }
    return (a0 + a1) + (a2 + a3);
}

/* A quick sum of x for the provisional mean of the two-pass statistics, which only has to
 * be close: the second pass measures and removes its error exactly. float32 data is summed
 * in float32 lanes (8 per vector, no widening); overflow is caught by the caller. */
static inline double FN(run_sum_rough)(const BN_T *x, ptrdiff_t n, ptrdiff_t st)
{
#if BN_SIMD_REDUCE && BN_IS_F32
    if (st == 1 && n >= 32) {
        __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
        ptrdiff_t i = 0;
        double tail = 0.0;
        for (; i + 32 <= n; i += 32) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(x + i));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(x + i + 8));
            v2 = _mm256_add_ps(v2, _mm256_loadu_ps(x + i + 16));
            v3 = _mm256_add_ps(v3, _mm256_loadu_ps(x + i + 24));
        }
        for (; i < n; ++i) tail += (double)x[i];
        v0 = _mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3));
        return bn_hsum4(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v0)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1)))) +
               tail;
    }
#endif
    return FN(run_sum)(x, n, st);
}

/* sum of d and of d*d, d = x - m */
static inline void FN(run_dev)(const BN_T *x, ptrdiff_t n, ptrdiff_t st, double m, double *sd,
                               double *sdd)
{
    double d0 = 0, d1 = 0, q0 = 0, q1 = 0;
    ptrdiff_t i = 0;
    if (st == 1) {
#if BN_SIMD_REDUCE
        __m256d vm = _mm256_set1_pd(m), s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
        __m256d p0 = s0, p1 = s0, p2 = s0, p3 = s0;
        for (; i + 16 <= n; i += 16) {
            __m256d e0 = _mm256_sub_pd(BN_LOAD4D(x + i), vm);
            __m256d e1 = _mm256_sub_pd(BN_LOAD4D(x + i + 4), vm);
            __m256d e2 = _mm256_sub_pd(BN_LOAD4D(x + i + 8), vm);
            __m256d e3 = _mm256_sub_pd(BN_LOAD4D(x + i + 12), vm);
            s0 = _mm256_add_pd(s0, e0), p0 = _mm256_fmadd_pd(e0, e0, p0);
            s1 = _mm256_add_pd(s1, e1), p1 = _mm256_fmadd_pd(e1, e1, p1);
            s2 = _mm256_add_pd(s2, e2), p2 = _mm256_fmadd_pd(e2, e2, p2);
            s3 = _mm256_add_pd(s3, e3), p3 = _mm256_fmadd_pd(e3, e3, p3);
        }
        for (; i + 4 <= n; i += 4) {
            __m256d e0 = _mm256_sub_pd(BN_LOAD4D(x + i), vm);
            s0 = _mm256_add_pd(s0, e0), p0 = _mm256_fmadd_pd(e0, e0, p0);
        }
        d0 = bn_hsum4(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
        q0 = bn_hsum4(_mm256_add_pd(_mm256_add_pd(p0, p1), _mm256_add_pd(p2, p3)));
#endif
        for (; i + 2 <= n; i += 2) {
            double e0 = (double)x[i] - m, e1 = (double)x[i + 1] - m;
            d0 += e0, d1 += e1, q0 += e0 * e0, q1 += e1 * e1;
        }
        for (; i < n; ++i) {
            double e = (double)x[i] - m;
            d0 += e, q0 += e * e;
        }
    } else {
        for (; i < n; ++i) {
            double e = (double)x[i * st] - m;
            d0 += e, q0 += e * e;
        }
    }
    *sd += d0 + d1;
    *sdd += q0 + q1;
}

/* y = (x - m) * a + b. In place (y == x) is fine: each vector is read before it is written. */
static inline void FN(run_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                  ptrdiff_t n, BN_T m, BN_T a, BN_T b)
{
    ptrdiff_t i = 0;
    if (xst == 1 && yst == 1) {
#if BN_SIMD_REDUCE
        BN_V vm = BN_VSET1(m), va = BN_VSET1(a), vb = BN_VSET1(b);
        for (; i + 2 * BN_W <= n; i += 2 * BN_W) {
            BN_V y0 = BN_VFMA(BN_VSUB(BN_VLOAD(x + i), vm), va, vb);
            BN_V y1 = BN_VFMA(BN_VSUB(BN_VLOAD(x + i + BN_W), vm), va, vb);
            BN_VSTORE(y + i, y0), BN_VSTORE(y + i + BN_W, y1);
        }
        for (; i + BN_W <= n; i += BN_W) BN_VSTORE(y + i, BN_VFMA(BN_VSUB(BN_VLOAD(x + i), vm), va, vb));
        for (; i < n; ++i) y[i] = BN_SFMA(x[i] - m, a, b);
#endif
        for (; i < n; ++i) y[i] = (x[i] - m) * a + b;
    } else {
        for (; i < n; ++i) y[i * yst] = (x[i * xst] - m) * a + b;
    }
}

/* sum of dy and of dy * (x - m) */
static inline void FN(run_bwd_sums)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                    ptrdiff_t n, double m, double *sdy, double *sdyx)
{
    double s0 = 0, s1 = 0, p0 = 0, p1 = 0;
    ptrdiff_t i = 0;
    if (dyst == 1 && xst == 1) {
#if BN_SIMD_REDUCE
        __m256d vm = _mm256_set1_pd(m), g0 = _mm256_setzero_pd(), g1 = g0, g2 = g0, g3 = g0;
        __m256d h0 = g0, h1 = g0, h2 = g0, h3 = g0;
        for (; i + 16 <= n; i += 16) {
            __m256d a = BN_LOAD4D(dy + i), b = BN_LOAD4D(dy + i + 4);
            __m256d c = BN_LOAD4D(dy + i + 8), d = BN_LOAD4D(dy + i + 12);
            g0 = _mm256_add_pd(g0, a), g1 = _mm256_add_pd(g1, b);
            g2 = _mm256_add_pd(g2, c), g3 = _mm256_add_pd(g3, d);
            h0 = _mm256_fmadd_pd(a, _mm256_sub_pd(BN_LOAD4D(x + i), vm), h0);
            h1 = _mm256_fmadd_pd(b, _mm256_sub_pd(BN_LOAD4D(x + i + 4), vm), h1);
            h2 = _mm256_fmadd_pd(c, _mm256_sub_pd(BN_LOAD4D(x + i + 8), vm), h2);
            h3 = _mm256_fmadd_pd(d, _mm256_sub_pd(BN_LOAD4D(x + i + 12), vm), h3);
        }
        for (; i + 4 <= n; i += 4) {
            __m256d a = BN_LOAD4D(dy + i);
            g0 = _mm256_add_pd(g0, a);
            h0 = _mm256_fmadd_pd(a, _mm256_sub_pd(BN_LOAD4D(x + i), vm), h0);
        }
        s0 = bn_hsum4(_mm256_add_pd(_mm256_add_pd(g0, g1), _mm256_add_pd(g2, g3)));
        p0 = bn_hsum4(_mm256_add_pd(_mm256_add_pd(h0, h1), _mm256_add_pd(h2, h3)));
#endif
        for (; i + 2 <= n; i += 2) {
            double g0 = (double)dy[i], g1 = (double)dy[i + 1];
            s0 += g0, s1 += g1;
            p0 += g0 * ((double)x[i] - m), p1 += g1 * ((double)x[i + 1] - m);
        }
        for (; i < n; ++i) {
            double g = (double)dy[i];
            s0 += g, p0 += g * ((double)x[i] - m);
        }
    } else {
        for (; i < n; ++i) {
            double g = (double)dy[i * dyst];
            s0 += g, p0 += g * ((double)x[i * xst] - m);
        }
    }
    *sdy += s0 + s1;
    *sdyx += p0 + p1;
}

/* dx = a * dy + (b * (x - m) + c) */
static inline void FN(run_bwd_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                  BN_T *dx, ptrdiff_t dxst, ptrdiff_t n, BN_T m, BN_T a, BN_T b,
                                  BN_T c)
{
    ptrdiff_t i = 0;
    if (dyst == 1 && xst == 1 && dxst == 1) {
#if BN_SIMD_REDUCE
        BN_V vm = BN_VSET1(m), va = BN_VSET1(a), vb = BN_VSET1(b), vc = BN_VSET1(c);
        for (; i + BN_W <= n; i += BN_W)
            BN_VSTORE(dx + i, BN_VFMA(va, BN_VLOAD(dy + i),
                                      BN_VFMA(BN_VSUB(BN_VLOAD(x + i), vm), vb, vc)));
        for (; i < n; ++i) dx[i] = BN_SFMA(a, dy[i], BN_SFMA(x[i] - m, b, c));
#endif
        for (; i < n; ++i) dx[i] = a * dy[i] + ((x[i] - m) * b + c);
    } else {
        for (; i < n; ++i) dx[i * dxst] = a * dy[i * dyst] + ((x[i * xst] - m) * b + c);
    }
}

/* dx = a * dy */
static inline void FN(run_scale)(const BN_T *dy, ptrdiff_t dyst, BN_T *dx, ptrdiff_t dxst,
                                 ptrdiff_t n, BN_T a)
{
    ptrdiff_t i = 0;
    if (dyst == 1 && dxst == 1) {
#if BN_SIMD_REDUCE
        BN_V va = BN_VSET1(a);
        for (; i + BN_W <= n; i += BN_W) BN_VSTORE(dx + i, BN_VMUL(va, BN_VLOAD(dy + i)));
#endif
        for (; i < n; ++i) dx[i] = a * dy[i];
    } else {
        for (; i < n; ++i) dx[i * dxst] = a * dy[i * dyst];
    }
}

/* y[j] = (x[j] - m[j]) * a[j] + b[j] */
static inline void FN(cols_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                   ptrdiff_t cn, const BN_T *m, const BN_T *a, const BN_T *b)
{
    ptrdiff_t j = 0;
    if (xst == 1 && yst == 1) {
#if BN_SIMD_REDUCE
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTORE(y + j, BN_VFMA(BN_VSUB(BN_VLOAD(x + j), BN_VLOAD(m + j)), BN_VLOAD(a + j),
                                     BN_VLOAD(b + j)));
        for (; j < cn; ++j) y[j] = BN_SFMA(x[j] - m[j], a[j], b[j]);
#endif
        for (; j < cn; ++j) y[j] = (x[j] - m[j]) * a[j] + b[j];
    } else {
        for (; j < cn; ++j) y[j * yst] = (x[j * xst] - m[j]) * a[j] + b[j];
    }
}

/* dx[j] = a[j] * dy[j] + (b[j] * (x[j] - m[j]) + c[j]) */
static inline void FN(cols_bwd_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                   BN_T *dx, ptrdiff_t dxst, ptrdiff_t cn, const BN_T *m,
                                   const BN_T *a, const BN_T *b, const BN_T *c)
{
    ptrdiff_t j = 0;
    if (dyst == 1 && xst == 1 && dxst == 1) {
#if BN_SIMD_REDUCE
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTORE(dx + j, BN_VFMA(BN_VLOAD(a + j), BN_VLOAD(dy + j),
                                      BN_VFMA(BN_VSUB(BN_VLOAD(x + j), BN_VLOAD(m + j)),
                                              BN_VLOAD(b + j), BN_VLOAD(c + j))));
        for (; j < cn; ++j) dx[j] = BN_SFMA(a[j], dy[j], BN_SFMA(x[j] - m[j], b[j], c[j]));
#endif
        for (; j < cn; ++j) dx[j] = a[j] * dy[j] + ((x[j] - m[j]) * b[j] + c[j]);
    } else {
        for (; j < cn; ++j)
            dx[j * dxst] = a[j] * dy[j * dyst] + ((x[j * xst] - m[j]) * b[j] + c[j]);
    }
}

/* dx[j] = a[j] * dy[j] */
static inline void FN(cols_scale)(const BN_T *dy, ptrdiff_t dyst, BN_T *dx, ptrdiff_t dxst,
                                  ptrdiff_t cn, const BN_T *a)
{
    ptrdiff_t j = 0;
    if (dyst == 1 && dxst == 1) {
#if BN_SIMD_REDUCE
        for (; j + BN_W <= cn; j += BN_W)
            BN_VSTORE(dx + j, BN_VMUL(BN_VLOAD(a + j), BN_VLOAD(dy + j)));
#endif
        for (; j < cn; ++j) dx[j] = a[j] * dy[j];
    } else {
        for (; j < cn; ++j) dx[j * dxst] = a[j] * dy[j * dyst];
    }
}

/* Reductions over `rows` rows (row stride rs) of cn channels (channel stride cst), one
 * accumulator per channel, rows in order. With SIMD, blocks of 16 contiguous channels keep
 * their accumulators in registers for all the rows; the order per channel is the same. */

/* acc[j] += sum over rows of x[r, j] */
static inline void FN(cols_sum_rows)(const BN_T *x, ptrdiff_t rs, ptrdiff_t rows, ptrdiff_t cst,
                                     ptrdiff_t cn, double *acc)
{
    ptrdiff_t j = 0, r;
#if BN_SIMD_REDUCE
    for (; cst == 1 && j + 16 <= cn; j += 16) {
        __m256d v0 = _mm256_loadu_pd(acc + j), v1 = _mm256_loadu_pd(acc + j + 4);
        __m256d v2 = _mm256_loadu_pd(acc + j + 8), v3 = _mm256_loadu_pd(acc + j + 12);
        for (r = 0; r < rows; ++r) {
            const BN_T *p = x + r * rs + j;
            v0 = _mm256_add_pd(v0, BN_LOAD4D(p)), v1 = _mm256_add_pd(v1, BN_LOAD4D(p + 4));
            v2 = _mm256_add_pd(v2, BN_LOAD4D(p + 8)), v3 = _mm256_add_pd(v3, BN_LOAD4D(p + 12));
        }
        _mm256_storeu_pd(acc + j, v0), _mm256_storeu_pd(acc + j + 4, v1);
        _mm256_storeu_pd(acc + j + 8, v2), _mm256_storeu_pd(acc + j + 12, v3);
    }
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *p = x + r * rs;
        ptrdiff_t i;
        for (i = j; i < cn; ++i) acc[i] += (double)p[i * cst];
    }
}

/* acc[j] += a quick sum over rows of x[r, j] (see run_sum_rough) */
static inline void FN(cols_sum_rows_rough)(const BN_T *x, ptrdiff_t rs, ptrdiff_t rows,
                                           ptrdiff_t cst, ptrdiff_t cn, double *acc)
{
#if BN_SIMD_REDUCE && BN_IS_F32
    if (cst == 1 && cn >= 16) {
        ptrdiff_t j = 0, r;
        for (; j + 16 <= cn; j += 16) {
            __m256 v0 = _mm256_setzero_ps(), v1 = v0;
            for (r = 0; r < rows; ++r) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(x + r * rs + j));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(x + r * rs + j + 8));
            }
            _mm256_storeu_pd(acc + j, _mm256_add_pd(_mm256_loadu_pd(acc + j),
                                                    _mm256_cvtps_pd(_mm256_castps256_ps128(v0))));
            _mm256_storeu_pd(acc + j + 4, _mm256_add_pd(_mm256_loadu_pd(acc + j + 4),
                                                        _mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1))));
            _mm256_storeu_pd(acc + j + 8, _mm256_add_pd(_mm256_loadu_pd(acc + j + 8),
                                                        _mm256_cvtps_pd(_mm256_castps256_ps128(v1))));
            _mm256_storeu_pd(acc + j + 12, _mm256_add_pd(_mm256_loadu_pd(acc + j + 12),
                                                         _mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1))));
        }
        if (j < cn) FN(cols_sum_rows)(x + j, rs, rows, cst, cn - j, acc + j);
        return;
    }
#endif
    FN(cols_sum_rows)(x, rs, rows, cst, cn, acc);
}

/* sd[j] += sum of d, sdd[j] += sum of d*d, d = x[r, j] - m[j] */
static inline void FN(cols_dev_rows)(const BN_T *x, ptrdiff_t rs, ptrdiff_t rows, ptrdiff_t cst,
                                     ptrdiff_t cn, const double *m, double *sd, double *sdd)
{
    ptrdiff_t j = 0, r;
#if BN_SIMD_REDUCE
    for (; cst == 1 && j + 16 <= cn; j += 16) {
        __m256d m0 = _mm256_loadu_pd(m + j), m1 = _mm256_loadu_pd(m + j + 4);
        __m256d m2 = _mm256_loadu_pd(m + j + 8), m3 = _mm256_loadu_pd(m + j + 12);
        __m256d s0 = _mm256_loadu_pd(sd + j), s1 = _mm256_loadu_pd(sd + j + 4);
        __m256d s2 = _mm256_loadu_pd(sd + j + 8), s3 = _mm256_loadu_pd(sd + j + 12);
        __m256d q0 = _mm256_loadu_pd(sdd + j), q1 = _mm256_loadu_pd(sdd + j + 4);
        __m256d q2 = _mm256_loadu_pd(sdd + j + 8), q3 = _mm256_loadu_pd(sdd + j + 12);
        for (r = 0; r < rows; ++r) {
            const BN_T *p = x + r * rs + j;
            __m256d e0 = _mm256_sub_pd(BN_LOAD4D(p), m0), e1 = _mm256_sub_pd(BN_LOAD4D(p + 4), m1);
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
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *p = x + r * rs;
        ptrdiff_t i;
        for (i = j; i < cn; ++i) {
            double e = (double)p[i * cst] - m[i];
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
#if BN_SIMD_REDUCE
    for (; dycst == 1 && xcst == 1 && j + 16 <= cn; j += 16) {
        __m256d m0 = _mm256_loadu_pd(m + j), m1 = _mm256_loadu_pd(m + j + 4);
        __m256d m2 = _mm256_loadu_pd(m + j + 8), m3 = _mm256_loadu_pd(m + j + 12);
        __m256d g0 = _mm256_loadu_pd(sdy + j), g1 = _mm256_loadu_pd(sdy + j + 4);
        __m256d g2 = _mm256_loadu_pd(sdy + j + 8), g3 = _mm256_loadu_pd(sdy + j + 12);
        __m256d h0 = _mm256_loadu_pd(sdyx + j), h1 = _mm256_loadu_pd(sdyx + j + 4);
        __m256d h2 = _mm256_loadu_pd(sdyx + j + 8), h3 = _mm256_loadu_pd(sdyx + j + 12);
        for (r = 0; r < rows; ++r) {
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
#endif
    for (r = 0; r < rows; ++r) {
        const BN_T *pg = dy + r * dyrs, *px = x + r * xrs;
        ptrdiff_t i;
        for (i = j; i < cn; ++i) {
            double g = (double)pg[i * dycst];
            sdy[i] += g, sdyx[i] += g * ((double)px[i * xcst] - m[i]);
        }
    }
}
