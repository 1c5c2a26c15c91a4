/* Digests of the C core's outputs on fixed inputs: one line per (element type, case,
 * operation) with a 64-bit FNV-1a hash of every output's bytes. The SIMD kernel sets promise
 * the same bits on every CPU; this program is how that is checked across machines:
 *
 *   digest_bn_core avx2 > x86.txt                        (on x86-64)
 *   qemu-aarch64 ... digest_bn_core neon > arm.txt       (the aarch64 cross build)
 *   diff x86.txt arm.txt
 *
 * `digest_bn_core --check` (run by meson test) compares, in one process, every SIMD set this
 * CPU has (avx2 and avx512; neon) and 1 against 4 threads. Inputs come from integer
 * arithmetic only (no libm), so they are the same everywhere. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn/bn.h"

/* splitmix64 */
static uint64_t rng_state;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
/* a double in [-1, 1) on a grid of 2^-20 */
static double rng_unit(void) { return (double)(int64_t)(rng_next() >> 43) / (1 << 20) - 1.0; }

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    size_t i;
    for (i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}
#define FNV_START 0xcbf29ce484222325ull

/* Every call must succeed: a failed one would leave the previous outputs to be hashed. */
#define MUST(call)                                                                                \
    do {                                                                                          \
        if ((call) != BN_OK) {                                                                    \
            fprintf(stderr, "digest_bn_core: %s failed (%s)\n", #call, c->name);                  \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

/* One case: a shape, how its elements lie (planar NCHW-like, channels-last, or with a
 * channel stride of 2 in a wider buffer), and the values of one channel held constant (the
 * exact path) or not. */
typedef struct dcase {
    const char *name;
    bn_shape s;
    int layout; /* 0 planar (outer, C, inner); 1 channels-last (outer*inner rows of C); 2 strided */
    int constant_channel;
} dcase;

static const dcase cases[] = {
    {"planar 2x3x37", {2, 3, 37}, 0, 0},
    {"planar 4x5x53", {4, 5, 53}, 0, 1},
    {"planar 3x2x1", {3, 2, 1}, 0, 0},
    {"planar 2x7x300", {2, 7, 300}, 0, 0},
    {"planar 1x1x5000", {1, 1, 5000}, 0, 0},
    {"planar 8x32x64", {8, 32, 64}, 0, 0},
    {"planar 16x64x1024", {16, 64, 1024}, 0, 0},
    {"last 40x3", {40, 3, 1}, 1, 0},
    {"last 33x17", {33, 17, 1}, 1, 1},
    {"last 9x251", {9, 251, 1}, 1, 0},
    {"last 64x16", {64, 16, 1}, 1, 0},
    {"last 7x40", {7, 40, 1}, 1, 0},
    {"last 4096x64", {4096, 64, 1}, 1, 0},
    {"strided 6x5x9", {6, 5, 9}, 2, 0},
};
#define N_CASES ((int)(sizeof cases / sizeof cases[0]))

static bn_strides strides_of(const dcase *c)
{
    bn_shape s = c->s;
    bn_strides st;
    if (c->layout == 0)
        st.outer = s.channels * s.inner, st.channel = s.inner, st.inner = 1;
    else if (c->layout == 1)
        st.outer = s.channels, st.channel = 1, st.inner = s.channels;
    else
        st.outer = 2 * s.channels * s.inner, st.channel = 2 * s.inner, st.inner = 1;
    return st;
}

static size_t extent_of(const dcase *c)
{
    bn_strides st = strides_of(c);
    return (size_t)((c->s.outer - 1) * st.outer + (c->s.channels - 1) * st.channel +
                    (c->s.inner - 1) * st.inner + 1);
}

/* Values of each storage type from a double (t in [-1, 1)): float32/float64 by rounding;
 * float16/bfloat16 bit patterns built from t's grid value with integer arithmetic. */
static void put_f32(float *p, double v) { *p = (float)v; }
static void put_f64(double *p, double v) { *p = v; }
static void put_f16(uint16_t *p, double v)
{
    /* sign, exponent 12..18 (about 0.125 to 8), 10 mantissa bits, all from v's grid */
    int64_t g = (int64_t)((v + 1.0) * (1 << 20));
    *p = (uint16_t)(((g & 1) << 15) | ((12 + (g >> 1) % 7) << 10) | ((g >> 4) & 0x3ff));
}
static void put_bf16(uint16_t *p, double v)
{
    int64_t g = (int64_t)((v + 1.0) * (1 << 20));
    *p = (uint16_t)(((g & 1) << 15) | ((124 + (g >> 1) % 7) << 7) | ((g >> 4) & 0x7f));
}

/* Every operation on one case, for one element type: the lines "<type> <case> <op> <hash>". */
#define DIGEST_TYPE(tn, T)                                                                        \
    static void digest_##tn(const dcase *c, FILE *out)                                            \
    {                                                                                             \
        bn_shape s = c->s;                                                                        \
        bn_strides st = strides_of(c), ms = {s.inner, 0, 1};                                      \
        size_t n = extent_of(c), k, C = (size_t)s.channels;                                       \
        T *x = calloc(n, sizeof(T)), *dy = calloc(n, sizeof(T)), *z = calloc(n, sizeof(T));       \
        T *y = calloc(n, sizeof(T)), *dx = calloc(n, sizeof(T)), *dz = calloc(n, sizeof(T));      \
        unsigned char *mask = malloc((size_t)(s.outer * s.inner));                                \
        double *p = malloc(8 * C * sizeof(double));                                               \
        double *gamma = p, *beta = p + C, *mean = p + 2 * C, *var = p + 3 * C, *rm = p + 4 * C;   \
        double *rv = p + 5 * C, *dg = p + 6 * C, *db = p + 7 * C;                                 \
        bn_options opt;                                                                           \
        uint64_t h;                                                                               \
        ptrdiff_t o, i;                                                                           \
        rng_state = 12345;                                                                        \
        for (k = 0; k < n; ++k) {                                                                 \
            put_##tn(x + k, 100.0 + rng_unit() * 3.0);                                            \
            put_##tn(dy + k, rng_unit());                                                         \
            put_##tn(z + k, rng_unit() * 0.5);                                                    \
        }                                                                                         \
        if (c->constant_channel)                                                                  \
            for (o = 0; o < s.outer; ++o)                                                         \
                for (i = 0; i < s.inner; ++i) x[o * st.outer + i * st.inner] = x[0];              \
        for (k = 0; k < (size_t)(s.outer * s.inner); ++k) mask[k] = (rng_next() % 5) != 0;        \
        for (k = 0; k < C; ++k) {                                                                 \
            gamma[k] = 1.0 + rng_unit() * 0.5, beta[k] = rng_unit();                              \
            rm[k] = 100.0 + rng_unit(), rv[k] = 1.5 + rng_unit();                                 \
        }                                                                                         \
        /* statistics: plain and masked (planar and channels-last have unit inner strides) */     \
        MUST(bn_stats_##tn(s, x, st, mean, var, NULL));                                           \
        h = fnv1a(fnv1a(FNV_START, mean, C * 8), var, C * 8);                                     \
        fprintf(out, "%s %s stats %016llx\n", #tn, c->name, (unsigned long long)h);               \
        memset(&opt, 0, sizeof opt);                                                              \
        opt.mask = mask, opt.mask_strides = ms;                                                   \
        if (c->layout != 2) {                                                                     \
            MUST(bn_stats_##tn(s, x, st, mean, var, &opt));                                       \
            h = fnv1a(fnv1a(FNV_START, mean, C * 8), var, C * 8);                                 \
            fprintf(out, "%s %s masked-stats %016llx\n", #tn, c->name, (unsigned long long)h);    \
        }                                                                                         \
        /* forward and backward, training, on the masked positions' statistics */                 \
        if (c->layout != 2) {                                                                     \
            MUST(bn_forward_train_##tn(s, x, st, y, st, gamma, beta, 1e-5, mean, var, &opt));     \
            MUST(bn_backward_##tn(s, dy, st, x, st, dx, st, mean, var, gamma, 1e-5, 1, dg, db,     \
                                  &opt));                                                         \
            h = fnv1a(fnv1a(fnv1a(FNV_START, y, n * sizeof(T)), dx, n * sizeof(T)), dg, C * 8);   \
            h = fnv1a(fnv1a(fnv1a(h, db, C * 8), mean, C * 8), var, C * 8);                       \
            fprintf(out, "%s %s masked-train %016llx\n", #tn, c->name, (unsigned long long)h);    \
        }                                                                                         \
        /* forward, training: plain, then relu(bn(x) + z) */                                      \
        MUST(bn_forward_train_##tn(s, x, st, y, st, gamma, beta, 1e-5, mean, var, NULL));         \
        h = fnv1a(fnv1a(fnv1a(FNV_START, y, n * sizeof(T)), mean, C * 8), var, C * 8);            \
        fprintf(out, "%s %s forward-train %016llx\n", #tn, c->name, (unsigned long long)h);       \
        memset(&opt, 0, sizeof opt);                                                              \
        opt.residual = z, opt.residual_strides = st, opt.activation = BN_ACT_RELU;                \
        MUST(bn_forward_train_##tn(s, x, st, y, st, gamma, beta, 1e-5, mean, var, &opt));         \
        h = fnv1a(FNV_START, y, n * sizeof(T));                                                   \
        fprintf(out, "%s %s forward-train-relu %016llx\n", #tn, c->name, (unsigned long long)h);  \
        /* forward, inference */                                                                  \
        MUST(bn_forward_eval_##tn(s, x, st, y, st, rm, rv, gamma, beta, 1e-5, NULL));             \
        h = fnv1a(FNV_START, y, n * sizeof(T));                                                   \
        fprintf(out, "%s %s forward-eval %016llx\n", #tn, c->name, (unsigned long long)h);        \
        /* backward: training, then through relu (y, dz), then frozen statistics */               \
        MUST(bn_backward_##tn(s, dy, st, x, st, dx, st, mean, var, gamma, 1e-5, 1, dg, db, NULL)); \
        h = fnv1a(fnv1a(fnv1a(FNV_START, dx, n * sizeof(T)), dg, C * 8), db, C * 8);              \
        fprintf(out, "%s %s backward %016llx\n", #tn, c->name, (unsigned long long)h);            \
        memset(&opt, 0, sizeof opt);                                                              \
        MUST(bn_forward_train_##tn(s, x, st, y, st, gamma, beta, 1e-5, mean, var, NULL));         \
        opt.activation = BN_ACT_RELU, opt.y = y, opt.y_strides = st;                              \
        opt.dz = dz, opt.dz_strides = st;                                                         \
        MUST(bn_backward_##tn(s, dy, st, x, st, dx, st, mean, var, gamma, 1e-5, 1, dg, db, &opt)); \
        h = fnv1a(fnv1a(fnv1a(fnv1a(FNV_START, dx, n * sizeof(T)), dz, n * sizeof(T)), dg,        \
                        C * 8), db, C * 8);                                                       \
        fprintf(out, "%s %s backward-relu %016llx\n", #tn, c->name, (unsigned long long)h);       \
        MUST(bn_backward_##tn(s, dy, st, x, st, dx, st, rm, rv, gamma, 1e-5, 0, dg, db, NULL));   \
        h = fnv1a(fnv1a(fnv1a(FNV_START, dx, n * sizeof(T)), dg, C * 8), db, C * 8);              \
        fprintf(out, "%s %s backward-frozen %016llx\n", #tn, c->name, (unsigned long long)h);     \
        /* the many-process backward's last step, with this batch's own sums */                   \
        MUST(bn_backward_total_##tn(s, dy, st, x, st, dx, st, mean, var, gamma, 1e-5,             \
                               (double)(s.outer * s.inner), db, dg));                             \
        h = fnv1a(FNV_START, dx, n * sizeof(T));                                                  \
        fprintf(out, "%s %s backward-total %016llx\n", #tn, c->name, (unsigned long long)h);      \
        free(x), free(dy), free(z), free(y), free(dx), free(dz), free(mask), free(p);             \
    }
DIGEST_TYPE(f32, float)
DIGEST_TYPE(f64, double)
DIGEST_TYPE(f16, uint16_t)
DIGEST_TYPE(bf16, uint16_t)

/* All digests of the active kernel set, written to out. */
static void digest_all(FILE *out)
{
    int k;
    for (k = 0; k < N_CASES; ++k) {
        digest_f32(&cases[k], out);
        digest_f64(&cases[k], out);
        digest_f16(&cases[k], out);
        digest_bf16(&cases[k], out);
    }
}

/* The digests of one set and thread count, as a string (caller frees). */
static char *digests_of(const char *isa, int threads)
{
    FILE *f = tmpfile();
    long size;
    char *text;
    if (!f) return NULL;
    bn_set_isa(isa);
    bn_set_num_threads(threads);
    digest_all(f);
    size = ftell(f);
    rewind(f);
    text = calloc((size_t)size + 1, 1);
    if (text && fread(text, 1, (size_t)size, f) != (size_t)size) text[0] = '\0';
    fclose(f);
    return text;
}

static int check(void)
{
    static const char *simd[] = {"avx2", "avx512", "neon"};
    char *first = NULL;
    const char *first_isa = NULL;
    int k, failures = 0, sets = 0;
    for (k = 0; k < (int)(sizeof simd / sizeof simd[0]); ++k) {
        char *one, *four;
        if (!bn_isa_available(simd[k])) continue;
        one = digests_of(simd[k], 1), four = digests_of(simd[k], 4);
        if (!one || !four || !*one) {
            printf("FAIL %s: no digests\n", simd[k]);
            return 1;
        }
        if (strcmp(one, four) != 0)
            printf("FAIL %s: 1 and 4 threads differ\n", simd[k]), ++failures;
        if (first && strcmp(first, one) != 0)
            printf("FAIL %s and %s differ\n", first_isa, simd[k]), ++failures;
        printf("%s: %s\n", simd[k], first ? "same bits as the first set" : "digested");
        if (!first) first = one, first_isa = simd[k];
        else free(one);
        free(four);
        ++sets;
    }
    free(first);
    printf("%d SIMD sets compared, %d failures\n", sets, failures);
    return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--check") == 0) return check();
    if (argc != 2 || argv[1][0] == '-') {
        fprintf(stderr, "usage: digest_bn_core ISA | --check\n");
        return 2;
    }
    if (bn_set_isa(argv[1]) != BN_OK) {
        fprintf(stderr, "digest_bn_core: kernel set %s is not available here\n", argv[1]);
        return 2;
    }
    digest_all(stdout);
    return 0;
}
