/* Work partition and deterministic merges, shared by every ISA (compiled once). */
#include "unit.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Work (elements times passes over them) below which a call runs on one thread: starting
 * and joining an OpenMP team costs a few microseconds, and on a busy machine a descheduled
 * thread stalls the whole call. Measured on the 2-core development machine (float32, C
 * harness, best of 3000): with 32768 elements a second thread made training backward
 * (3 passes) 15-25% faster and the forward (2 passes) 5-10% faster, but inference (1 pass)
 * 5-15% slower; at 65536 elements every operation gained 10-35%. */
#ifndef BN_PARALLEL_MIN_WORK
#define BN_PARALLEL_MIN_WORK 65536
#endif
/* Elements per thread below which more threads stop paying: measured on a 16-core Xeon
 * (float32, (256, 1024)), inference, training forward and backward all ran fastest on 8
 * threads (32768 elements each) and 15-40% slower on 16. */
#ifndef BN_MIN_ELEMS_PER_THREAD
#define BN_MIN_ELEMS_PER_THREAD 32768
#endif

static int requested_threads = 0; /* 0: OpenMP's default */

/* At most this many threads per processor: more only costs (and a team of a million
 * threads exhausts the process's memory for stacks). */
#define BN_MAX_THREADS_PER_PROC 4
#define BN_MAX_THREADS_MIN 16

/* The cap, computed once: omp_get_num_procs asks the kernel for the affinity mask each time
 * (a system call in every kernel call, ~6% of a 16K-element inference in perf). */
int bn_max_threads(void)
{
#ifdef _OPENMP
    static int cached = 0;
    int cap;
#pragma omp atomic read
    cap = cached;
    if (cap == 0) {
        int procs = omp_get_num_procs();
        cap = BN_MAX_THREADS_PER_PROC * (procs > 0 ? procs : 1);
        if (cap < BN_MAX_THREADS_MIN) cap = BN_MAX_THREADS_MIN;
#pragma omp atomic write
        cached = cap;
    }
    return cap;
#else
    return 1;
#endif
}

/* fork(): the OpenMP runtime's thread pool does not survive into the child (with GNU
 * OpenMP the child's first parallel region waits forever for the parent's threads). The
 * child therefore runs single-threaded, without entering OpenMP at all, until it asks for
 * threads again with bn_set_num_threads (as PyTorch does). */
#if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
static void serial_after_fork(void) { requested_threads = 1; }
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, serial_after_fork); }
#define BN_WATCH_FORK() pthread_once(&fork_handler_once, register_fork_handler)
#else
#define BN_WATCH_FORK() ((void)0)
#endif

void bn_set_num_threads(int n)
{
    int cap = bn_max_threads();
    BN_WATCH_FORK();
    requested_threads = n > 0 ? (n < cap ? n : cap) : 0;
}

int bn_get_num_threads(void)
{
#ifdef _OPENMP
    int n;
    BN_WATCH_FORK();
    if (requested_threads > 0) return requested_threads;
    n = omp_get_max_threads();
    return n < bn_max_threads() ? n : bn_max_threads();
#else
    return 1;
#endif
}

int bn_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int bn_threads_for(ptrdiff_t elems, int passes, ptrdiff_t units)
{
    int n = bn_get_num_threads();
    ptrdiff_t most = elems / BN_MIN_ELEMS_PER_THREAD;
    if ((double)elems * passes < BN_PARALLEL_MIN_WORK) return 1;
    if (most < n) n = most < 2 ? 2 : (int)most;
    if (units < n) n = (int)units;
    return n < 1 ? 1 : n;
}

/* The block malloc returned is kept just before the aligned pointer. */
#define BN_LINE 64

void *bn_alloc_aligned(size_t bytes)
{
    unsigned char *raw = (unsigned char *)malloc(bytes + BN_LINE + sizeof(void *)), *p;
    if (!raw) return NULL;
    p = raw + sizeof(void *);
    p += (BN_LINE - (uintptr_t)p % BN_LINE) % BN_LINE;
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    return p;
}

void bn_free_aligned(void *p)
{
    void *raw;
    if (!p) return;
    memcpy(&raw, (unsigned char *)p - sizeof raw, sizeof raw);
    free(raw);
}

int bn_shape_ok(bn_shape s) { return s.outer >= 0 && s.channels >= 0 && s.inner >= 0; }

static ptrdiff_t ceil_div(ptrdiff_t a, ptrdiff_t b) { return b > 0 ? (a + b - 1) / b : 0; }
static ptrdiff_t min_p(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static ptrdiff_t max_p(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }

bn_tiling bn_make_tiling(bn_shape s, ptrdiff_t c_begin, ptrdiff_t c_count)
{
    bn_tiling t;
    t.planar = s.inner > 1;
    t.c_begin = c_begin, t.c_count = c_count;
    if (t.planar) {
        /* A unit is a run of whole channels of one row where it can be (contiguous memory
         * when the channels are; short inner runs one row apart are what the prefetchers
         * cannot follow), then several rows of those channels. Row blocks follow from the
         * whole shape, so a channel's pieces are the same for every channel range. */
        ptrdiff_t cb_full;
        t.ib = min_p(s.inner, BN_UNIT_ELEMS);
        cb_full = t.ib == s.inner ? max_p(1, BN_UNIT_ELEMS / t.ib) : 1;
        t.ob = max_p(1, min_p(s.outer, BN_UNIT_ELEMS / (min_p(s.channels, cb_full) * t.ib)));
        t.cb = max_p(1, min_p(c_count, cb_full));
        t.n_cb = ceil_div(c_count, t.cb);
    } else {
        /* Row blocks follow from the whole shape, so they are the same for every range. */
        t.ib = 1;
        t.ob = max_p(1, min_p(s.outer, BN_UNIT_ELEMS / max_p(1, min_p(s.channels, BN_MAX_CHANNEL_BLOCK))));
        t.cb = max_p(1, min_p(c_count, BN_MAX_CHANNEL_BLOCK));
        t.n_cb = ceil_div(c_count, t.cb);
    }
    t.n_ib = max_p(1, ceil_div(s.inner, t.ib));
    t.n_ob = max_p(1, ceil_div(s.outer, t.ob));
    t.parts = t.n_ob * t.n_ib;
    t.units = t.parts * t.n_cb;
    return t;
}

bn_tiling bn_make_pass_tiling(bn_shape s, ptrdiff_t c_begin, ptrdiff_t c_count)
{
    bn_tiling t = bn_make_tiling(s, c_begin, c_count);
    if (!t.planar) {
        /* no partial results to keep per channel: a unit is a block of rows over all the
         * range's channels, one piece of memory when the channels are contiguous */
        t.cb = max_p(1, c_count), t.n_cb = 1;
        t.ob = max_p(1, min_p(s.outer, BN_UNIT_ELEMS / t.cb));
        t.n_ob = max_p(1, ceil_div(s.outer, t.ob));
        t.parts = t.n_ob, t.units = t.n_ob;
    }
    return t;
}

/* Bytes of a chunk: small enough that a chunk stays in the last-level cache (32 MB on the
 * 2-core machine) beside the output being written and the other threads' data, large enough
 * to hold many work units for the threads: 4 MB, or 1 MB per thread on many cores. On the
 * 16-core device machine (float32, 16 threads, best of two runs) 1 MB per thread took the
 * training forward of 32x64x56x56 from 0.40 to 0.31 ms and its backward from 0.58 to 0.43
 * (64x128x56x56: 2.9 to 2.2 ms), and channels-last shapes within 2% either way; 2 MB per
 * thread was no better. Chunks never change results: a channel's pieces do not depend on
 * them. */
#ifndef BN_CHUNK_BYTES
#define BN_CHUNK_BYTES ((size_t)4 << 20)
#endif
#ifndef BN_CHUNK_BYTES_PER_THREAD
#define BN_CHUNK_BYTES_PER_THREAD ((size_t)1 << 20)
#endif

ptrdiff_t bn_chunk_channels(bn_shape s, int arrays, size_t itemsize)
{
    size_t per_channel = (size_t)(s.outer * s.inner) * itemsize * (size_t)arrays;
    size_t budget = BN_CHUNK_BYTES_PER_THREAD * (size_t)bn_get_num_threads();
    ptrdiff_t cc;
    if (budget < BN_CHUNK_BYTES) budget = BN_CHUNK_BYTES;
    cc = per_channel ? (ptrdiff_t)(budget / per_channel) : s.channels;
    if (!(s.inner > 1)) {
        /* Interleaved channels share cache lines and pages: a chunk reads a piece of every
         * row, and pieces much shorter than a page cost nearly whole rows of memory traffic
         * (the prefetchers fetch around them). So chunks are runs of at least 1 KB, and of
         * whole multiples of that, even when that overflows the chunk's byte budget. */
        ptrdiff_t run = (ptrdiff_t)(1024 / itemsize);
        cc = cc < run ? run : (cc + run - 1) / run * run;
    }
    return max_p(1, min_p(cc, s.channels));
}

double bn_part_count(const bn_tiling *t, bn_shape s, ptrdiff_t k)
{
    ptrdiff_t ob = k / t->n_ib, ib = k % t->n_ib;
    ptrdiff_t rows = min_p(t->ob, s.outer - ob * t->ob);
    ptrdiff_t len = min_p(t->ib, s.inner - ib * t->ib);
    return (double)(max_p(rows, 0) * max_p(len, 0));
}

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
        pcount[k] = (double)mask_block_count(mk, o0, min_p(t->ob, s.outer - o0), i0,
                                             min_p(t->ib, s.inner - i0));
    }
}

ptrdiff_t bn_merge_blocks(const bn_tiling *t) { return ceil_div(t->c_count, BN_MERGE_BLOCK); }

/* A block's channels are merged side by side: the part counts, and so the merge weights, are
 * the same for every channel, and independent channels keep the FPU busy where one channel's
 * chain of dependent steps would wait on each. Each channel's arithmetic, and so its bits, is
 * that of merging it alone, parts in order. */
void bn_merge_moments(const bn_tiling *t, bn_shape s, const double *pmean, const double *pm2,
                      const double *pcount, double *mean, double *var, ptrdiff_t b)
{
    ptrdiff_t j, k, P = t->parts, S = BN_PART_STRIDE(t->c_count), c0 = b * BN_MERGE_BLOCK;
    ptrdiff_t nc = min_p(BN_MERGE_BLOCK, t->c_count - c0);
    const double *pm = pmean + c0, *p2 = pm2 + c0;
    double n = 0.0, m[BN_MERGE_BLOCK], m2[BN_MERGE_BLOCK];
    for (k = 0; k < P; ++k) {
        double nb = pcount ? pcount[k] : bn_part_count(t, s, k);
        if (nb == 0.0) continue;
        if (n == 0.0) {
            for (j = 0; j < nc; ++j) m[j] = pm[k * S + j], m2[j] = p2[k * S + j];
            n = nb;
        } else {
            double nab = n + nb, w1 = nb / nab, w2 = n * nb / nab;
            for (j = 0; j < nc; ++j) {
                double delta = pm[k * S + j] - m[j];
                m[j] += delta * w1;
                m2[j] += p2[k * S + j] + delta * delta * w2;
            }
            n = nab;
        }
    }
    for (j = 0; j < nc; ++j) {
        mean[c0 + j] = n > 0.0 ? m[j] : NAN;
        /* M2 is a sum of squares: clamp the rounding below zero, keep NaN */
        var[c0 + j] = n > 0.0 ? (m2[j] > 0.0 ? m2[j] / n : (m2[j] == m2[j] ? 0.0 : m2[j]))
                              : NAN;
    }
}

void bn_merge_sums(const bn_tiling *t, const double *part, double *total, ptrdiff_t b)
{
    ptrdiff_t j, k, P = t->parts, S = BN_PART_STRIDE(t->c_count), c0 = b * BN_MERGE_BLOCK;
    ptrdiff_t nc = min_p(BN_MERGE_BLOCK, t->c_count - c0);
    double acc[BN_MERGE_BLOCK];
    for (j = 0; j < nc; ++j) acc[j] = 0.0;
    for (k = 0; k < P; ++k)
        for (j = 0; j < nc; ++j) acc[j] += part[k * S + c0 + j];
    for (j = 0; j < nc; ++j) total[c0 + j] = acc[j];
}

/* p * q * r with the exponents added apart, so that an intermediate product cannot overflow
 * or underflow when the result is representable. */
static double bn_mul3(double p, double q, double r)
{
    int ep, eq, er;
    if (!(isfinite(p) && isfinite(q) && isfinite(r)) || p == 0.0 || q == 0.0 || r == 0.0)
        return p * q * r;
    p = frexp(p, &ep), q = frexp(q, &eq), r = frexp(r, &er);
    return ldexp(p * q * r, ep + eq + er);
}

/* x - mean, halved when it overflows double although both are finite (float64 values near
 * 1.8e308 of both signs): *twice is set to 1, and the caller doubles its result. Halving is
 * exact at those magnitudes. */
static double bn_difference(double x, double mean, int *twice)
{
    double d = x - mean;
    *twice = isinf(d) && isfinite(x) && isfinite(mean);
    return *twice ? 0.5 * x - 0.5 * mean : d;
}

double bn_exact_y(const bn_call *e, ptrdiff_t c, double x)
{
    int twice;
    double d = bn_difference(x, e->mean[c], &twice), inv = 1.0 / sqrt(e->var[c] + e->eps);
    double g = e->gamma ? e->gamma[c] : 1.0, b = e->beta ? e->beta[c] : 0.0;
    /* x == mean normalizes to 0 whatever inv is (inf when var + eps == 0) */
    return b + (d == 0.0 ? g * 0.0 : (twice ? 2.0 : 1.0) * bn_mul3(g, d, inv));
}


double bn_exact_dx(const bn_call *e, ptrdiff_t c, double dy, double x, int trained)
{
    double inv = 1.0 / sqrt(e->var[c] + e->eps), g = e->gamma ? e->gamma[c] : 1.0;
    double d, xhat, t;
    int twice;
    if (!trained || !e->sdy) return bn_mul3(g, inv, dy);
    /* gamma * inv * (dy - mean(dy) - xhat * mean(dy * xhat)) */
    d = bn_difference(x, e->mean[c], &twice);
    xhat = d == 0.0 ? 0.0 : (twice ? 2.0 : 1.0) * (d * inv);
    t = e->sdy[c - e->c_begin] / e->n;
    t = dy - t - xhat * (e->sdyxhat[c - e->c_begin] / e->n);
    return bn_mul3(g, inv, t);
}
