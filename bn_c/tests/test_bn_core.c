/* C tests of the core, without Python: known answers on both layouts, every ISA path,
 * and bit-identical results for 1 and several threads. Run by `meson test`. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn/bn.h"

static int failures = 0;

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            ++failures;                                                                           \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                           \
            printf(__VA_ARGS__);                                                                  \
            printf("\n");                                                                         \
        }                                                                                         \
    } while (0)

static int close_to(double a, double b, double tol) { return fabs(a - b) <= tol * (1 + fabs(b)); }

/* The mini-batch (4,5,2,1), (3,4,6,0), (1,4,7,9) as (N=3, D=4): interleaved layout. */
static void test_known_stats(void)
{
    const float x[12] = {4, 5, 2, 1, 3, 4, 6, 0, 1, 4, 7, 9};
    const double want_mean[4] = {8.0 / 3, 13.0 / 3, 5, 10.0 / 3};
    const double want_var[4] = {14.0 / 9, 2.0 / 9, 14.0 / 3, 146.0 / 9};
    bn_shape s = {3, 4, 1};
    bn_strides st = {4, 1, 1};
    double mean[4], var[4];
    int c;
    CHECK(bn_stats_f32(s, x, st, mean, var, NULL) == BN_OK, "stats failed");
    for (c = 0; c < 4; ++c) {
        CHECK(close_to(mean[c], want_mean[c], 1e-15), "mean[%d] = %.17g", c, mean[c]);
        CHECK(close_to(var[c], want_var[c], 1e-15), "var[%d] = %.17g", c, var[c]);
    }
    /* The same numbers transposed, as (outer=1, C=4, inner=3): planar layout. */
    {
        const double xt[12] = {4, 3, 1, 5, 4, 4, 2, 6, 7, 1, 0, 9};
        bn_shape s2 = {1, 4, 3};
        bn_strides st2 = {12, 3, 1};
        CHECK(bn_stats_f64(s2, xt, st2, mean, var, NULL) == BN_OK, "stats f64 failed");
        for (c = 0; c < 4; ++c) {
            CHECK(close_to(mean[c], want_mean[c], 1e-15), "planar mean[%d] = %.17g", c, mean[c]);
            CHECK(close_to(var[c], want_var[c], 1e-15), "planar var[%d] = %.17g", c, var[c]);
        }
    }
}

/* Forward train then backward against the formulas, NCHW-like (2, 3, 5). */
static void test_forward_backward(void)
{
    enum { N = 2, C = 3, I = 5, E = N * C * I };
    double x[E], y[E], dy[E], dx[E], mean[C], var[C], dgamma[C], dbeta[C];
    const double gamma[C] = {1.5, -2, 0.5}, beta[C] = {0.1, 0.2, -0.3}, eps = 1e-5;
    bn_shape s = {N, C, I};
    bn_strides st = {C * I, I, 1};
    int e, c, o, i;
    for (e = 0; e < E; ++e) x[e] = sin(e * 1.3) * 3 + e % 4, dy[e] = cos(e * 0.7);
    CHECK(bn_forward_train_f64(s, x, st, y, st, gamma, beta, eps, mean, var, NULL) == BN_OK, "fwd");
    CHECK(bn_backward_f64(s, dy, st, x, st, dx, st, mean, var, gamma, eps, 1, dgamma, dbeta, NULL) ==
              BN_OK,
          "bwd");
    for (c = 0; c < C; ++c) {
        double inv = 1 / sqrt(var[c] + eps), sdy = 0, sdyx = 0, n = N * I;
        for (o = 0; o < N; ++o)
            for (i = 0; i < I; ++i) {
                e = o * C * I + c * I + i;
                CHECK(close_to(y[e], gamma[c] * (x[e] - mean[c]) * inv + beta[c], 1e-13), "y");
                sdy += dy[e], sdyx += dy[e] * (x[e] - mean[c]) * inv;
            }
        CHECK(close_to(dbeta[c], sdy, 1e-13), "dbeta[%d]", c);
        CHECK(close_to(dgamma[c], sdyx, 1e-13), "dgamma[%d]", c);
        for (o = 0; o < N; ++o)
            for (i = 0; i < I; ++i) {
                double xhat, want;
                e = o * C * I + c * I + i;
                xhat = (x[e] - mean[c]) * inv;
                want = gamma[c] * inv * (dy[e] - sdy / n - xhat * sdyx / n);
                CHECK(close_to(dx[e], want, 1e-12), "dx[%d] = %g, want %g", e, dx[e], want);
            }
    }
}

/* Large NHWC and NCHW float32 problems: the same bits for 1 and 3 threads. */
static void test_thread_determinism(void)
{
    enum { N = 16, C = 7, I = 1031 };
    size_t e, E = (size_t)N * C * I;
    float *x = malloc(E * sizeof(float)), *y1 = malloc(E * sizeof(float)),
          *y3 = malloc(E * sizeof(float));
    double m1[C], v1[C], m3[C], v3[C];
    bn_shape nchw = {N, C, I}, nhwc = {N * I, C, 1};
    bn_strides s_nchw = {C * I, I, 1}, s_nhwc = {C, 1, 1};
    for (e = 0; e < E; ++e) x[e] = (float)(1000 + sin((double)e) * 10);
    bn_set_num_threads(1);
    bn_forward_train_f32(nchw, x, s_nchw, y1, s_nchw, NULL, NULL, 1e-5, m1, v1, NULL);
    bn_set_num_threads(3);
    bn_forward_train_f32(nchw, x, s_nchw, y3, s_nchw, NULL, NULL, 1e-5, m3, v3, NULL);
    CHECK(memcmp(m1, m3, sizeof m1) == 0 && memcmp(v1, v3, sizeof v1) == 0, "nchw stats differ");
    CHECK(memcmp(y1, y3, E * sizeof(float)) == 0, "nchw output differs");
    bn_set_num_threads(1);
    bn_forward_train_f32(nhwc, x, s_nhwc, y1, s_nhwc, NULL, NULL, 1e-5, m1, v1, NULL);
    bn_set_num_threads(3);
    bn_forward_train_f32(nhwc, x, s_nhwc, y3, s_nhwc, NULL, NULL, 1e-5, m3, v3, NULL);
    CHECK(memcmp(m1, m3, sizeof m1) == 0 && memcmp(v1, v3, sizeof v1) == 0, "nhwc stats differ");
    CHECK(memcmp(y1, y3, E * sizeof(float)) == 0, "nhwc output differs");
    bn_set_num_threads(0);
    free(x), free(y1), free(y3);
}

/* A constant channel normalizes to beta exactly; the variance is exactly 0. */
static void test_constant_channel(void)
{
    double x[64], y[64], mean[1], var[1], beta[1] = {0.25};
    bn_shape s = {64, 1, 1};
    bn_strides st = {1, 1, 1};
    int e;
    for (e = 0; e < 64; ++e) x[e] = 1e7 + 0.1;
    bn_forward_train_f64(s, x, st, y, st, NULL, beta, 1e-5, mean, var, NULL);
    CHECK(var[0] == 0.0, "var of a constant = %g", var[0]);
    for (e = 0; e < 64; ++e) CHECK(y[e] == 0.25, "y[%d] = %.17g", e, y[e]);
}

/* eps = 0: var + eps == 0 and gamma / sqrt(var + eps) is infinite; a constant channel still
 * gives beta (the exact path), next to an ordinary channel (both layouts). */
static void test_zero_variance_eps0(void)
{
    float x[2 * 40], y[2 * 40];
    double mean[2], var[2], beta[2] = {0.25, -0.5};
    bn_shape planar = {1, 2, 40}, rows = {40, 2, 1};
    bn_strides sp = {80, 40, 1}, sr = {2, 1, 1};
    int e;
    for (e = 0; e < 40; ++e) x[e] = 0.1f, x[40 + e] = (float)e;
    bn_forward_train_f32(planar, x, sp, y, sp, NULL, beta, 0.0, mean, var, NULL);
    CHECK(var[0] == 0.0, "planar var of a constant = %g", var[0]);
    for (e = 0; e < 40; ++e) {
        CHECK(y[e] == 0.25f, "planar y[%d] = %.9g", e, y[e]);
        CHECK(close_to(y[40 + e], (e - 19.5) / sqrt(var[1]) - 0.5, 1e-6), "planar y[%d]", 40 + e);
    }
    for (e = 0; e < 40; ++e) x[2 * e] = 0.1f, x[2 * e + 1] = (float)e;
    bn_forward_train_f32(rows, x, sr, y, sr, NULL, beta, 0.0, mean, var, NULL);
    for (e = 0; e < 40; ++e) {
        CHECK(y[2 * e] == 0.25f, "interleaved y[%d] = %.9g", 2 * e, y[2 * e]);
        CHECK(close_to(y[2 * e + 1], (e - 19.5) / sqrt(var[1]) - 0.5, 1e-6), "interleaved");
    }
}

/* A batch split into two parts along N, as two processes hold it: each part's dgamma and
 * dbeta with the whole batch's statistics, added up, give through bn_backward_total the
 * whole batch's dx row by row; with the whole batch as the one part, the very same bits. */
static void test_backward_total(void)
{
    enum { N = 5, C = 3, I = 4, E = N * C * I, N0 = 2 };
    float x[E], dy[E], dx[E], dxp[E];
    double mean[C], var[C], dg[C], db[C], dg1[C], db1[C], sdy[C], sdyxhat[C];
    const double gamma[C] = {1.5, -2, 0.5}, eps = 1e-5;
    bn_shape s = {N, C, I}, s0 = {N0, C, I}, s1 = {N - N0, C, I};
    bn_strides st = {C * I, I, 1};
    int e, c;
    for (e = 0; e < E; ++e) x[e] = (float)(sin(e * 1.3) * 3 + e % 4), dy[e] = (float)cos(e * 0.7);
    CHECK(bn_stats_f32(s, x, st, mean, var, NULL) == BN_OK, "stats");
    CHECK(bn_backward_f32(s, dy, st, x, st, dx, st, mean, var, gamma, eps, 1, dg, db, NULL) == BN_OK,
          "bwd");
    CHECK(bn_backward_total_f32(s, dy, st, x, st, dxp, st, mean, var, gamma, eps, N * I, db, dg) ==
              BN_OK,
          "total, one part");
    for (e = 0; e < E; ++e) CHECK(dxp[e] == dx[e], "one part: dx[%d] %.9g != %.9g", e, dxp[e], dx[e]);
    /* two parts */
    CHECK(bn_backward_f32(s0, dy, st, x, st, NULL, st, mean, var, gamma, eps, 0, dg1, db1, NULL) == BN_OK,
          "part 0 sums");
    for (c = 0; c < C; ++c) sdy[c] = db1[c], sdyxhat[c] = dg1[c];
    CHECK(bn_backward_f32(s1, dy + N0 * C * I, st, x + N0 * C * I, st, NULL, st, mean, var, gamma,
                          eps, 0, dg1, db1, NULL) == BN_OK,
          "part 1 sums");
    for (c = 0; c < C; ++c) sdy[c] += db1[c], sdyxhat[c] += dg1[c];
    CHECK(bn_backward_total_f32(s0, dy, st, x, st, dxp, st, mean, var, gamma, eps, N * I, sdy,
                                sdyxhat) == BN_OK,
          "total, part 0");
    CHECK(bn_backward_total_f32(s1, dy + N0 * C * I, st, x + N0 * C * I, st, dxp + N0 * C * I, st,
                                mean, var, gamma, eps, N * I, sdy, sdyxhat) == BN_OK,
          "total, part 1");
    for (e = 0; e < E; ++e)
        CHECK(close_to(dxp[e], dx[e], 1e-6), "two parts: dx[%d] %.9g, want %.9g", e, dxp[e], dx[e]);
    CHECK(bn_backward_total_f32(s, dy, st, x, st, dxp, st, mean, var, gamma, eps, 0.0, sdy,
                                sdyxhat) == BN_ERR_ARG,
          "n = 0 accepted");
    CHECK(bn_backward_total_f32(s, dy, st, x, st, dxp, st, mean, var, gamma, eps, N * I, NULL,
                                sdyxhat) == BN_ERR_ARG,
          "NULL sums accepted");
}

/* Masked statistics: those of the unmasked positions (here, NaN at the masked ones changes
 * nothing); an all-true mask gives the unmasked bits; a channel stride is refused; the fused
 * relu(bn(x) + z) and the relu's backward gate. Planar (N=2, C=2, I=5). */
static void test_variants(void)
{
    float x[20], y[20], y0[20], z[20], dy[20], dz[20], dx[20];
    unsigned char mask[10], all[10];
    double mean[2], var[2], m0[2], v0[2], dg[2], db[2];
    bn_shape s = {2, 2, 5};
    bn_strides st = {10, 5, 1};
    bn_options opt;
    int i, c, o;
    for (i = 0; i < 20; ++i) x[i] = (float)((i * 7) % 11) - 3.0f, z[i] = 0.25f, dy[i] = 1.0f;
    for (i = 0; i < 10; ++i) mask[i] = (unsigned char)(i % 3 != 0), all[i] = 1;
    for (o = 0; o < 2; ++o) /* garbage where the mask is clear */
        for (i = 0; i < 5; ++i)
            if (!mask[o * 5 + i]) x[o * 10 + i] = NAN;
    memset(&opt, 0, sizeof opt);
    opt.mask = mask, opt.mask_strides.outer = 5, opt.mask_strides.inner = 1;
    CHECK(bn_stats_f32(s, x, st, mean, var, &opt) == BN_OK, "masked stats");
    for (c = 0; c < 2; ++c) {
        double sum = 0, sq = 0, n = 0, m;
        for (o = 0; o < 2; ++o)
            for (i = 0; i < 5; ++i)
                if (mask[o * 5 + i]) sum += x[o * 10 + c * 5 + i], n += 1;
        m = sum / n;
        for (o = 0; o < 2; ++o)
            for (i = 0; i < 5; ++i)
                if (mask[o * 5 + i]) sq += (x[o * 10 + c * 5 + i] - m) * (x[o * 10 + c * 5 + i] - m);
        CHECK(close_to(mean[c], m, 1e-12) && close_to(var[c], sq / n, 1e-12),
              "masked channel %d: %g %g, want %g %g", c, mean[c], var[c], m, sq / n);
    }
    opt.mask_strides.channel = 1;
    CHECK(bn_stats_f32(s, x, st, mean, var, &opt) == BN_ERR_ARG, "a mask's channel stride");
    for (i = 0; i < 20; ++i) x[i] = (float)((i * 7) % 11) - 3.0f;
    opt.mask = all, opt.mask_strides.channel = 0;
    CHECK(bn_forward_train_f32(s, x, st, y, st, NULL, NULL, 1e-5, mean, var, &opt) == BN_OK,
          "masked forward");
    CHECK(bn_forward_train_f32(s, x, st, y0, st, NULL, NULL, 1e-5, m0, v0, NULL) == BN_OK,
          "forward");
    CHECK(memcmp(y, y0, sizeof y) == 0 && memcmp(mean, m0, sizeof m0) == 0 &&
              memcmp(var, v0, sizeof v0) == 0, "an all-true mask changed the bits");
    memset(&opt, 0, sizeof opt);
    opt.residual = z, opt.residual_strides = st, opt.activation = BN_ACT_RELU;
    CHECK(bn_forward_eval_f32(s, x, st, y, st, m0, v0, NULL, NULL, 1e-5, &opt) == BN_OK,
          "fused forward");
    for (i = 0; i < 20; ++i)
        CHECK(close_to(y[i], fmax(y0[i] + 0.25, 0.0), 1e-6), "relu(bn + z) at %d: %g", i, y[i]);
    memset(&opt, 0, sizeof opt);
    opt.activation = BN_ACT_RELU, opt.y = y, opt.y_strides = st, opt.dz = dz, opt.dz_strides = st;
    CHECK(bn_backward_f32(s, dy, st, x, st, dx, st, m0, v0, NULL, 1e-5, 1, dg, db, &opt) == BN_OK,
          "relu backward");
    for (i = 0; i < 20; ++i) CHECK(dz[i] == (y[i] > 0 ? 1.0f : 0.0f), "dz at %d", i);
    opt.y = NULL;
    CHECK(bn_backward_f32(s, dy, st, x, st, dx, st, m0, v0, NULL, 1e-5, 1, dg, db, &opt) ==
              BN_ERR_ARG, "relu backward without y");
}

/* Calls made from the caller's own OpenMP threads, each on its own data: every call must be
 * whole and alone, as if made from one thread (none of the core's loops may be shared with
 * the caller's team), and give the bits of the same call made outside. */
static void test_calls_from_callers_threads(void)
{
#ifdef _OPENMP
    enum { T = 4, N = 8, C = 5, I = 37, E = N * C * I };
    static float x[T][E], y[T][E], want_y[T][E];
    static double mean[T][C], var[T][C], want_mean[T][C], want_var[T][C];
    bn_shape s = {N, C, I};
    bn_strides st = {C * I, I, 1};
    int k, e, bad = 0;
    for (k = 0; k < T; ++k)
        for (e = 0; e < E; ++e) x[k][e] = (float)((e * (k + 3)) % 23) - 7.5f * (float)k;
    for (k = 0; k < T; ++k)
        bn_forward_train_f32(s, x[k], st, want_y[k], st, NULL, NULL, 1e-5, want_mean[k],
                             want_var[k], NULL);
#pragma omp parallel for num_threads(T) schedule(static, 1) reduction(+ : bad)
    for (k = 0; k < T; ++k) {
        int i;
        for (i = 0; i < 20; ++i) {
            bad += bn_forward_train_f32(s, x[k], st, y[k], st, NULL, NULL, 1e-5, mean[k], var[k],
                                        NULL) != BN_OK;
            bad += memcmp(y[k], want_y[k], sizeof y[k]) != 0;
            bad += memcmp(mean[k], want_mean[k], sizeof mean[k]) != 0;
            bad += memcmp(var[k], want_var[k], sizeof var[k]) != 0;
        }
    }
    CHECK(bad == 0, "%d calls from the caller's threads differ from the same calls alone", bad);
#endif
}

/* The same bits wherever x, dy and the output lie within a cache line or a page: the
 * forward passes and the backward, planar and channels-last, on runs long enough for the
 * aligned head of channels-last rows (520 values), planar runs of 300 and short rows (20).
 * Whatever splits a run by address (that head, non-temporal stores) must compute every
 * element as the rest of the run does. */
#define BN_TEST_ALIGN64(p) ((float *)(((uintptr_t)(p) + 63) & ~(uintptr_t)63))
static void test_outputs_do_not_depend_on_alignment(void)
{
    enum { N = 6, C = 520, I = 300, PAD = 4096, MAXE = N * 2 * C, OPS = 5 };
    /* long and short runs in both layouts; runs of whole vectors in 64 and 16 (planar rows
     * written aligned to the output) and rows of 32 channels, an odd number of them (rows
     * taken in pairs) */
    static const ptrdiff_t shapes[][3] = {{N, 3, I},  {N * 2, C, 1}, {N * 16, 20, 1},
                                          {N, 5, 64}, {N, 7, 16},    {N * 2 + 1, 32, 1}};
    static const size_t offsets[] = {0, 4, 16, 36, 60, 2048, 4092};
    float *bx = malloc(sizeof(float) * (MAXE + 2 * PAD));
    float *bd = malloc(sizeof(float) * (MAXE + 2 * PAD));
    float *by = malloc(sizeof(float) * (MAXE + 2 * PAD)), *ref = malloc(sizeof(float) * OPS * MAXE);
    float *ax = BN_TEST_ALIGN64(bx), *ad = BN_TEST_ALIGN64(bd), *ay = BN_TEST_ALIGN64(by);
    double g[C], b[C], mean[C], var[C], dg[C], db[C];
    int k, j, o, op;
    for (j = 0; j < C; ++j) g[j] = 0.5 + 0.01 * j, b[j] = 0.25 - 0.001 * j;
    for (k = 0; k < (int)(sizeof shapes / sizeof shapes[0]); ++k) {
        bn_shape s = {shapes[k][0], shapes[k][1], shapes[k][2]};
        bn_strides st = {s.channels * s.inner, s.inner, 1};
        ptrdiff_t E = s.outer * s.channels * s.inner, e;
        for (o = 0; o < (int)(sizeof offsets / sizeof offsets[0]); ++o) {
            /* the reference (offset 0): every array on a 64-byte boundary, where the runs need
             * no aligned head; then x and dy move by the offset (in floats), the output by 13
             * floats more */
            float *x = o == 0 ? ax : ax + offsets[o] / 4 + 16;
            float *dy = o == 0 ? ad : ad + offsets[o] / 4 + 8;
            float *y = o == 0 ? ay : ay + (offsets[o] / 4 + 13) % 1024;
            for (e = 0; e < E; ++e) {
                x[e] = (float)((e * 7919) % 1000) * 0.01f - 3.0f;
                dy[e] = (float)((e * 104729) % 997) * 0.002f - 1.0f;
            }
            for (op = 0; op < OPS; ++op) {
                float *r = ref + op * MAXE;
                bn_options epi;
                int rc;
                memset(&epi, 0, sizeof epi); /* relu(bn(x) + dy): the epilogue's loads */
                epi.residual = dy, epi.residual_strides = st, epi.activation = BN_ACT_RELU;
                if (op == 0)
                    rc = bn_forward_train_f32(s, x, st, y, st, g, b, 1e-5, mean, var, NULL);
                else if (op == 1)
                    rc = bn_forward_eval_f32(s, x, st, y, st, mean, var, g, b, 1e-5, NULL);
                else if (op == 2)
                    rc = bn_backward_f32(s, dy, st, x, st, y, st, mean, var, g, 1e-5, 1, dg, db,
                                         NULL);
                else if (op == 3) /* frozen statistics: dx = a * dy */
                    rc = bn_backward_f32(s, dy, st, x, st, y, st, mean, var, g, 1e-5, 0, dg, db,
                                         NULL);
                else
                    rc = bn_forward_eval_f32(s, x, st, y, st, mean, var, g, b, 1e-5, &epi);
                CHECK(rc == BN_OK, "call %d failed", op);
                if (o == 0)
                    memcpy(r, y, sizeof(float) * (size_t)E);
                else
                    CHECK(memcmp(r, y, sizeof(float) * (size_t)E) == 0,
                          "shape %d op %d: output at offset %d differs from offset 0", k, op,
                          (int)offsets[o]);
            }
        }
    }
    free(bx), free(bd), free(by), free(ref);
}

int main(void)
{
    static const char *isas[] = {"baseline", "avx2", "avx512", "neon"};
    int k, ran = 0;
    CHECK(bn_set_isa("no-such-isa") == BN_ERR_ISA, "unknown ISA accepted");
    for (k = 0; k < (int)(sizeof isas / sizeof isas[0]); ++k) {
        if (!bn_isa_available(isas[k])) continue;
        CHECK(bn_set_isa(isas[k]) == BN_OK, "set_isa(%s)", isas[k]);
        CHECK(strcmp(bn_active_isa(), isas[k]) == 0, "active %s", bn_active_isa());
        test_known_stats();
        test_forward_backward();
        test_thread_determinism();
        test_constant_channel();
        test_zero_variance_eps0();
        test_backward_total();
        test_variants();
        test_calls_from_callers_threads();
        test_outputs_do_not_depend_on_alignment();
        printf("isa %-8s checked (openmp: %d)\n", isas[k], bn_has_openmp());
        ++ran;
    }
    CHECK(ran >= 1, "no ISA ran");
    printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
