/* Innermost loops over one run of elements, for element type BN_T (name BN_TN).
 * Included by each kernel family once per element type; no include guard on purpose.
 *
 * "run" loops walk n elements of one channel (stride st) and reduce them to scalars.
 * "cols" loops walk one row across cn channels (stride st) and update per-channel arrays.
 * Accumulation is in double; the results depend only on the data, never on the threads. */
#define FN(name) BN_CAT2(name, BN_TN)

/* sum of x */
static inline double FN(run_sum)(const BN_T *x, ptrdiff_t n, ptrdiff_t st)
{
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    ptrdiff_t i = 0;
    if (st == 1) {
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

/* sum of d and of d*d, d = x - m */
static inline void FN(run_dev)(const BN_T *x, ptrdiff_t n, ptrdiff_t st, double m, double *sd,
                               double *sdd)
{
    double d0 = 0, d1 = 0, q0 = 0, q1 = 0;
    ptrdiff_t i = 0;
    if (st == 1) {
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

/* y = (x - m) * a + b */
static inline void FN(run_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                  ptrdiff_t n, BN_T m, BN_T a, BN_T b)
{
    ptrdiff_t i;
    if (xst == 1 && yst == 1) {
        for (i = 0; i < n; ++i) y[i] = (x[i] - m) * a + b;
    } else {
        for (i = 0; i < n; ++i) y[i * yst] = (x[i * xst] - m) * a + b;
    }
}

/* sum of dy and of dy * (x - m) */
static inline void FN(run_bwd_sums)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                    ptrdiff_t n, double m, double *sdy, double *sdyx)
{
    double s0 = 0, s1 = 0, p0 = 0, p1 = 0;
    ptrdiff_t i = 0;
    if (dyst == 1 && xst == 1) {
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
    ptrdiff_t i;
    if (dyst == 1 && xst == 1 && dxst == 1) {
        for (i = 0; i < n; ++i) dx[i] = a * dy[i] + ((x[i] - m) * b + c);
    } else {
        for (i = 0; i < n; ++i) dx[i * dxst] = a * dy[i * dyst] + ((x[i * xst] - m) * b + c);
    }
}

/* dx = a * dy */
static inline void FN(run_scale)(const BN_T *dy, ptrdiff_t dyst, BN_T *dx, ptrdiff_t dxst,
                                 ptrdiff_t n, BN_T a)
{
    ptrdiff_t i;
    if (dyst == 1 && dxst == 1) {
        for (i = 0; i < n; ++i) dx[i] = a * dy[i];
    } else {
        for (i = 0; i < n; ++i) dx[i * dxst] = a * dy[i * dyst];
    }
}

/* acc[j] += x[j] */
static inline void FN(cols_sum)(const BN_T *x, ptrdiff_t st, ptrdiff_t cn, double *acc)
{
    ptrdiff_t j;
    if (st == 1) {
        for (j = 0; j < cn; ++j) acc[j] += (double)x[j];
    } else {
        for (j = 0; j < cn; ++j) acc[j] += (double)x[j * st];
    }
}

/* sd[j] += x[j] - m[j]; sdd[j] += (x[j] - m[j])^2 */
static inline void FN(cols_dev)(const BN_T *x, ptrdiff_t st, ptrdiff_t cn, const double *m,
                                double *sd, double *sdd)
{
    ptrdiff_t j;
    if (st == 1) {
        for (j = 0; j < cn; ++j) {
            double e = (double)x[j] - m[j];
            sd[j] += e, sdd[j] += e * e;
        }
    } else {
        for (j = 0; j < cn; ++j) {
            double e = (double)x[j * st] - m[j];
            sd[j] += e, sdd[j] += e * e;
        }
    }
}

/* y[j] = (x[j] - m[j]) * a[j] + b[j] */
static inline void FN(cols_affine)(const BN_T *x, ptrdiff_t xst, BN_T *y, ptrdiff_t yst,
                                   ptrdiff_t cn, const BN_T *m, const BN_T *a, const BN_T *b)
{
    ptrdiff_t j;
    if (xst == 1 && yst == 1) {
        for (j = 0; j < cn; ++j) y[j] = (x[j] - m[j]) * a[j] + b[j];
    } else {
        for (j = 0; j < cn; ++j) y[j * yst] = (x[j * xst] - m[j]) * a[j] + b[j];
    }
}

/* sdy[j] += dy[j]; sdyx[j] += dy[j] * (x[j] - m[j]) */
static inline void FN(cols_bwd_sums)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                     ptrdiff_t cn, const double *m, double *sdy, double *sdyx)
{
    ptrdiff_t j;
    if (dyst == 1 && xst == 1) {
        for (j = 0; j < cn; ++j) {
            double g = (double)dy[j];
            sdy[j] += g, sdyx[j] += g * ((double)x[j] - m[j]);
        }
    } else {
        for (j = 0; j < cn; ++j) {
            double g = (double)dy[j * dyst];
            sdy[j] += g, sdyx[j] += g * ((double)x[j * xst] - m[j]);
        }
    }
}

/* dx[j] = a[j] * dy[j] + (b[j] * (x[j] - m[j]) + c[j]) */
static inline void FN(cols_bwd_dx)(const BN_T *dy, ptrdiff_t dyst, const BN_T *x, ptrdiff_t xst,
                                   BN_T *dx, ptrdiff_t dxst, ptrdiff_t cn, const BN_T *m,
                                   const BN_T *a, const BN_T *b, const BN_T *c)
{
    ptrdiff_t j;
    if (dyst == 1 && xst == 1 && dxst == 1) {
        for (j = 0; j < cn; ++j) dx[j] = a[j] * dy[j] + ((x[j] - m[j]) * b[j] + c[j]);
    } else {
        for (j = 0; j < cn; ++j)
            dx[j * dxst] = a[j] * dy[j * dyst] + ((x[j * xst] - m[j]) * b[j] + c[j]);
    }
}

/* dx[j] = a[j] * dy[j] */
static inline void FN(cols_scale)(const BN_T *dy, ptrdiff_t dyst, BN_T *dx, ptrdiff_t dxst,
                                  ptrdiff_t cn, const BN_T *a)
{
    ptrdiff_t j;
    if (dyst == 1 && dxst == 1) {
        for (j = 0; j < cn; ++j) dx[j] = a[j] * dy[j];
    } else {
        for (j = 0; j < cn; ++j) dx[j * dxst] = a[j] * dy[j * dyst];
    }
}
