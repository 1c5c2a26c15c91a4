/* Shared by the kernel files: work partition, partial-result merges, thread count. */
#ifndef BN_INTERNAL_H
#define BN_INTERNAL_H

#include "bn/bn.h"

/* Each kernel file is compiled once per ISA with -DBN_ISA=<name>; only its exported
 * functions carry the suffix (bn_stats_f32_avx2), everything else is static. */
#ifndef BN_ISA
#define BN_ISA baseline
#endif
#define BN_CAT3_(a, b, c) a##_##b##_##c
#define BN_CAT3(a, b, c) BN_CAT3_(a, b, c)
#define BN_EXPORT(op, tn) BN_CAT3(op, tn, BN_ISA)
#define BN_CAT2_(a, b) a##_##b
#define BN_CAT2(a, b) BN_CAT2_(a, b)

/* Loops that take their variant flags as arguments are forced inline, so that callers
 * passing constants get a loop without the unused variants' code. */
#if defined(__GNUC__) || defined(__clang__)
#define BN_ALWAYS_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BN_ALWAYS_INLINE static __forceinline
#else
#define BN_ALWAYS_INLINE static inline
#endif

/* Element types of the kernel templates (see eltype.h). */
#define BN_KIND_F32 0
#define BN_KIND_F64 1
#define BN_KIND_F16 2
#define BN_KIND_BF16 3

/* Elements in one work unit. Small enough that a unit stays in L2 between its two passes,
 * large enough that the per-unit overhead vanishes. It never depends on the thread count, so
 * the partial results, merged in a fixed order, are the same for any number of threads. */
#define BN_UNIT_ELEMS 16384
/* At most this many channels per unit of the channels-contiguous layout (stack accumulators). */
#define BN_MAX_CHANNEL_BLOCK 512

/* The (outer, channels, inner) plane of each channel is cut into `parts` pieces.
 * planar (inner > 1): a unit is (channel block, outer block, inner block): runs along inner;
 *   the channel block is 1 unless a whole channel is smaller than a unit.
 * interleaved (inner == 1): a unit is (outer block, channel block): runs across channels.
 * A tiling may cover a range of channels [c_begin, c_begin + c_count) of the shape; the
 * pieces of a channel, and so its results, never depend on that range or on the threads. */
typedef struct bn_tiling {
    int planar;
    ptrdiff_t c_begin, c_count; /* the channels this tiling covers */
    ptrdiff_t ob, ib, cb;       /* block sizes along outer, inner, channels */
    ptrdiff_t n_ob, n_ib, n_cb; /* number of blocks along each */
    ptrdiff_t parts;            /* partial results per channel */
    ptrdiff_t units;            /* independent work units */
} bn_tiling;

bn_tiling bn_make_tiling(bn_shape s, ptrdiff_t c_begin, ptrdiff_t c_count);
/* The tiling of an elementwise pass (normalize, dx): the same as bn_make_tiling for planar
 * data; for interleaved data, units of whole rows of the range's channels. */
bn_tiling bn_make_pass_tiling(bn_shape s, ptrdiff_t c_begin, ptrdiff_t c_count);
/* Number of values that partial k of every channel covers. */
double bn_part_count(const bn_tiling *t, bn_shape s, ptrdiff_t k);

/* Channels per cache-sized chunk: a chunk's data (`arrays` arrays of `itemsize` bytes per
 * element) stays in the last-level cache between the passes of a fused operation. */
ptrdiff_t bn_chunk_channels(bn_shape s, int arrays, size_t itemsize);

/* Partial results are stored part by part: partial k of the tiling's channel j (counted from
 * c_begin) is at k * BN_PART_STRIDE(c_count) + j. A unit writes one contiguous run of its
 * part's row, and rows are whole cache lines apart in a line-aligned buffer, so units running
 * side by side never write the same line. Stored channel by channel, eight parts shared each
 * line: on 16 threads that false sharing cost ~0.1 ms a call, more than reading 6 MB. */
#define BN_PART_STRIDE(cc) (((cc) + 7) / 8 * 8)

/* Memory aligned to a cache line (64 bytes), freed with bn_free_aligned. */
void *bn_alloc_aligned(size_t bytes);
/* Memory that starts `at` bytes into a page (modulo 4096), freed with bn_free_aligned. */
void *bn_alloc_at(size_t bytes, size_t at);
void bn_free_aligned(void *p);

/* Partial results are merged in blocks of channels, one block per call. On a team, blocks of
 * BN_MERGE_BLOCK channels, so that the threads share the merge (serial, it cost more than the
 * reductions themselves on 16 threads for channels-last data with a hundred parts per
 * channel); on one thread blocks of BN_MERGE_BLOCK_MAX, as each block's calls and short
 * loops cost about 40 ns (one thread, (64, 128): statistics and training forward 9%, backward
 * 7% faster than in blocks of 16). A channel's arithmetic does not depend on its block. */
#define BN_MERGE_BLOCK 16
#define BN_MERGE_BLOCK_MAX 64
#define BN_MERGE_WIDTH(team) ((team) ? BN_MERGE_BLOCK : BN_MERGE_BLOCK_MAX)
/* Chan's merge of (count, mean, M2) partials of channels [lo, lo + nc) of tiling t (indexed
 * from 0 = t->c_begin; nc <= BN_MERGE_BLOCK_MAX), parts in order; writes their mean and var.
 * pcount: the count of each part (masked statistics), or NULL for the counts of the
 * tiling's geometry. */
void bn_merge_moments(const bn_tiling *t, bn_shape s, const double *pmean, const double *pm2,
                      const double *pcount, double *mean, double *var, ptrdiff_t lo,
                      ptrdiff_t nc);

/* A mask of a call (see bn_options): one byte per (outer, inner) position, byte strides mo
 * and mi, and the first position it sets, (ro, ri), whose value is each channel's reference
 * (see FN(reference)); count is how many positions it sets. */
typedef struct bn_mask {
    const unsigned char *m;
    ptrdiff_t mo, mi;
    ptrdiff_t ro, ri;
    double count;
} bn_mask;
/* The mask of opt over shape s, or 0 (plain) when opt has none; BN_ERR_ARG for a mask with
 * a channel stride. */
int bn_mask_of(const bn_options *opt, bn_shape s, bn_mask *mk);
/* How many positions of each part of tiling t the mask sets (pcount[k], k < t->parts):
 * the same for every channel, so counted once per call. */
void bn_part_mask_counts(const bn_tiling *t, bn_shape s, const bn_mask *mk, double *pcount);
/* Whether the mask sets position (o, i). */
#define BN_MASKED_IN(mk, o, i) ((mk)->m[(o) * (mk)->mo + (i) * (mk)->mi] != 0)
/* Plain sums of the partials of channels [lo, lo + nc), parts in order. */
void bn_merge_sums(const bn_tiling *t, const double *part, double *total, ptrdiff_t lo,
                   ptrdiff_t nc);

/* Per-channel coefficient arrays are laid out BN_COEF_STRIDE(C) apart: C values, then
 * BN_COEF_WRAP more that repeat them (value k at k mod C), so that a vector of coefficients
 * can be loaded at any channel of a flat channels-last run (BN_COEFS_WRAPPED, runs_impl.h). */
#define BN_COEF_WRAP 16
#define BN_COEF_STRIDE(C) ((C) + BN_COEF_WRAP)

/* The elementwise driver's operations and coefficient layouts (see FN(elementwise) in
 * runs_impl.h). */
enum { BN_OP_AFFINE, BN_OP_DX, BN_OP_SCALE };
enum { BN_COEFS_ONE, BN_COEFS_EACH, BN_COEFS_WRAPPED };

/* Threads to use for `passes` passes over `elems` elements split in `units` units. */
int bn_threads_for(ptrdiff_t elems, int passes, ptrdiff_t units);

/* The one place where a call becomes threaded or stays serial. BN_ON_THREADS(nt, fn, args)
 * runs fn(team, args): with nt > 1 (from bn_threads_for) inside one parallel region of nt
 * threads, team = 1, and the threads share fn's unit loops (BN_FOR_DYNAMIC, BN_FOR_STATIC);
 * else directly, team = 0, and those loops are plain loops. A serial call so never enters
 * OpenMP: it pays for no work share (a malloc per loop in GNU OpenMP, ~60 ns), and its loops
 * cannot bind to a parallel region of the caller's own (a caller's threads each making their
 * own call would otherwise share out each other's units). The loops' body is their last
 * argument, written twice by the macro. */
#ifdef _OPENMP
#define BN_ON_THREADS(nt, fn, ...)                                                                \
    do {                                                                                          \
        int bn_team_size_ = (nt);                                                                 \
        if (bn_team_size_ > 1) {                                                                  \
            _Pragma("omp parallel num_threads(bn_team_size_)") fn(1, __VA_ARGS__);                \
        } else {                                                                                  \
            fn(0, __VA_ARGS__);                                                                   \
        }                                                                                         \
    } while (0)
/* for (i = 0; i < n; ++i) body, shared by the team when team (the OpenMP for-pragma given,
 * its schedule dynamic or static), else a plain loop */
#define BN_FOR_TEAM(omp_for, team, i, n, ...)                                                     \
    do {                                                                                          \
        if (team) {                                                                               \
            _Pragma(omp_for) for (i = 0; i < (n); ++i) { __VA_ARGS__; }                           \
        } else {                                                                                  \
            for (i = 0; i < (n); ++i) { __VA_ARGS__; }                                            \
        }                                                                                         \
    } while (0)
#define BN_FOR_DYNAMIC(team, i, n, ...)                                                           \
    BN_FOR_TEAM("omp for schedule(dynamic)", team, i, n, __VA_ARGS__)
#define BN_FOR_STATIC(team, i, n, ...)                                                            \
    BN_FOR_TEAM("omp for schedule(static)", team, i, n, __VA_ARGS__)
/* an update of a variable the team shares */
#define BN_ATOMIC_ADD(team, v, w)                                                                 \
    do {                                                                                          \
        if (team) {                                                                               \
            _Pragma("omp atomic") v += (w);                                                       \
        } else {                                                                                  \
            v += (w);                                                                             \
        }                                                                                         \
    } while (0)
#else
#define BN_ON_THREADS(nt, fn, ...) ((void)(nt), fn(0, __VA_ARGS__))
#define BN_FOR_DYNAMIC(team, i, n, ...)                                                           \
    do {                                                                                          \
        (void)(team);                                                                             \
        for (i = 0; i < (n); ++i) { __VA_ARGS__; }                                                \
    } while (0)
#define BN_FOR_STATIC BN_FOR_DYNAMIC
#define BN_ATOMIC_ADD(team, v, w) ((void)(team), (v) += (w))
#endif

int bn_shape_ok(bn_shape s);

/* Outputs of this many bytes or more are written with non-temporal stores (see bn_call). */
#define BN_STREAM_MIN_BYTES ((double)(16 << 20))

/* What the elementwise pass of one call needs besides its per-channel coefficients.
 *
 * stream: the output is large (BN_STREAM_MIN_BYTES or more), so it is written with
 * non-temporal stores, which skip reading the destination's cache lines before writing them
 * and leave the cache to the input (as memcpy does for large copies). float32/float64 only.
 *
 * The rest is for the slow, exact path of "wide" channels: those whose coefficients do not
 * fit the compute type (gamma / sqrt(var + eps) beyond its range, eps = 0 with zero
 * variance, a given mean beyond the storage type's range). Elements of such channels are
 * computed one by one in double from the original parameters, products scaled so that no
 * intermediate overflows spuriously, and x == mean gives beta (conventions.md: zero variance
 * gives beta exactly). Built once, without ISA flags, so every kernel set gives the same bits
 * there. */
typedef struct bn_call {
    int stream;
    /* the forward's epilogue (see bn_options): y = act(bn(x) + z); z typed as x, or NULL */
    const void *z;
    bn_strides zs;
    int relu;
    const int *wide; /* channels of the current chunk that take the exact path (0: none) */
    const double *mean, *var, *gamma, *beta; /* per channel; gamma, beta may be NULL */
    double eps;
    /* training backward only: the sums of dy and dy * xhat of the current chunk, indexed
     * from channel c_begin, and the count n per channel */
    const double *sdy, *sdyxhat;
    ptrdiff_t c_begin;
    double n;
} bn_call;

/* The sums of a batch split across processes (bn_backward_total), for channels [0, C). */
typedef struct bn_batch_total {
    double n;
    const double *sum_dy, *sum_dy_xhat;
} bn_batch_total;

/* y = beta + gamma * (x - mean) / sqrt(var + eps) for one element of channel c. */
double bn_exact_y(const bn_call *e, ptrdiff_t c, double x);
/* dx of one element of channel c: through the statistics (trained, with e->sdy) or with
 * them frozen (also the masked positions of a masked training backward). */
double bn_exact_dx(const bn_call *e, ptrdiff_t c, double dy, double x, int trained);
/* dgamma = sum(dy * (x - mean)) / sqrt(var + eps), which is 0, not NaN, when the sum is 0
 * (a constant channel with eps = 0: every normalized value is 0). */
static inline double bn_dgamma(double sdyx, double inv)
{
    return sdyx == 0.0 ? 0.0 : sdyx * inv;
}

#endif
