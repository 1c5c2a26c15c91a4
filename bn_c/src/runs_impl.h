/* Innermost loops for the element type chosen by BN_KIND (see eltype.h). Included by each
 * kernel family once per element type; no include guard on purpose.
 *
 * Reductions: "run" loops walk n elements of one channel (stride st) and reduce them to
 * scalars; "cols" loops walk rows across cn channels (stride st). Accumulation is in
 * double; the results depend only on the data, never on the threads. With SIMD they use
 * sixteen double accumulators (bn_d16) in one lane order on every ISA.
 * Elementwise passes: one driver, `elementwise`, for the forward's y, the backward's dx and
 * its a * dy, over a run of one channel, a row across channels or flat channels-last rows,
 * with native-width vectors of the compute type (512 bits for float32/float64 with AVX-512,
 * with masked tails). AVX2, AVX-512 and NEON give the same bits: the lanes do the same
 * arithmetic. */
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
    bn_d16 vm = bn_d16_set1(m), vs = bn_d16_set1(0.0), vq = vs, one = bn_d16_set1(1.0);
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
                vs = bn_d16_sum(vs, e, one), vq = bn_d16_fma(e, e, vq);
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
 * (v < 0 gives 0; NaN and -0 stay). The elementwise driver takes z and relu as arguments and
 * is inlined into callers that pass constants, so the plain loops carry none of it. */
static inline BN_CT FN(epi)(BN_CT v, const BN_T *z, int relu)
{
    if (z) v += BN_LD(z);
    if (relu) v = v < 0 ? (BN_CT)0 : v;
    return v;
}
#define BN_ZAT(z, i, st) ((z) ? (z) + (i) * (st) : (z))

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

/* The channel `step` elements on in a flat channels-last run of C channels */
#define BN_NEXT_CHANNEL(c, step, C) ((c) = bn_next_channel((c), (step), (C)))

/* The elementwise passes: one driver for every operation and every loop shape. Element i of
 * n gets
 *   BN_OP_AFFINE  out = epi((x - m) * a + b)         the forward (z and relu: see epi)
 *   BN_OP_DX      out = a * dy + ((x - m) * b + c)   the training backward; a * dy + 0 where
 *                                                    the mask byte mk[i] is 0 (NULL: none)
 *   BN_OP_SCALE   out = a * dy                       the backward through given statistics
 * with the coefficients (arrays m, a, b, c by channel; those the operation does not use may
 * be NULL) of
 *   BN_COEFS_ONE      channel c0 (m[c0], ...): a run of one channel's values (planar rows)
 *   BN_COEFS_EACH     channel i (m[i], ...): a row across channels (channels-last)
 *   BN_COEFS_WRAPPED  channel i mod C, from the wrapped arrays (BN_COEF_STRIDE):
 *                     channels-last rows back to back (row stride C) taken as one flat run,
 *                     whose vectors may straddle rows; short rows then cost no per-row
 *                     overhead, and a streamed output has a single unaligned head. Same
 *                     values as BN_COEFS_EACH row by row.
 * op and coef are constants at every call and the driver is forced inline, so each call
 * compiles to the one loop it needs. Element strides of x, dy, z and out: the vector loops
 * need them all 1 (a mask needs that too; BN_COEFS_WRAPPED always has it), else the strided
 * scalar loop runs. The SIMD sets fuse every multiply-add, in the vector lanes and in the
 * scalar head and tail alike, so the vector width never changes a result; the baseline and
 * the strided loop compute as written. In place (out == x, dy or z) is fine: each vector is
 * read before it is written. With `stream`, full vectors are stored non-temporally from the
 * first aligned element on. With `long_run` (a constant; see BN_ALIGNS_RUN), the elements
 * before out's first vector boundary are written first, so that every later vector is
 * aligned, and the body reads each block of vectors before storing the one before it.
 * Neither changes a result: the split of a run by address computes each element as the
 * lanes do (checked by test_outputs_do_not_depend_on_alignment in bn_c/tests). */

/* Coefficient q (0 m, 1 a, 2 b, 3 c) of element i in channel k, as a scalar; one the
 * operation does not use is never read. `one` is BN_COEFS_ONE's, read once before the loops
 * (BN_EW_ONE_COEF): loops that keep a value live rather than the arrays and the channel
 * were measured to spill less (a planar (8, 32, 8, 8) backward: 1.35x slower before). */
#define BN_EW_USES(op, q) ((q) == 1 || ((op) != BN_OP_SCALE && ((q) != 3 || (op) == BN_OP_DX)))
#define BN_EW_ONE_COEF(op, coef, q, p, c0)                                                        \
    ((coef) == BN_COEFS_ONE && BN_EW_USES(op, q) ? (p)[c0] : (BN_CT)0)
BN_ALWAYS_INLINE BN_CT FN(ew_coef)(int op, int coef, int q, const BN_CT *p, BN_CT one,
                                   ptrdiff_t i, ptrdiff_t k)
{
    if (!BN_EW_USES(op, q)) return (BN_CT)0;
    return coef == BN_COEFS_ONE ? one : coef == BN_COEFS_WRAPPED ? p[k] : p[i];
}

/* One element: x, dy, z point at it (NULL where unused); `keep` is its mask byte's verdict;
 * `fused`: BN_SFMA, as the vector lanes (SIMD sets, unit strides), else as written. */
BN_ALWAYS_INLINE BN_CT FN(ew_one)(int op, int fused, const BN_T *x, const BN_T *dy,
                                  const BN_T *z, int relu, int keep, BN_CT m, BN_CT a, BN_CT b,
                                  BN_CT c)
{
    BN_CT t;
    if (op == BN_OP_SCALE) return a * BN_LD(dy);
    if (op == BN_OP_AFFINE)
        return FN(epi)(fused ? BN_SFMA(BN_LD(x) - m, a, b) : (BN_LD(x) - m) * a + b, z, relu);
    t = fused ? BN_SFMA(BN_LD(x) - m, b, c) : (BN_LD(x) - m) * b + c;
    if (!keep) t = (BN_CT)0;
    return fused ? BN_SFMA(a, BN_LD(dy), t) : a * BN_LD(dy) + t;
}

#if BN_SIMD
/* The vector at p, or (tail, BN_VMASK sets only) its first r lanes. */
BN_ALWAYS_INLINE BN_V FN(vld_r)(const BN_T *p, int tail, ptrdiff_t r)
{
#if BN_VMASK
    if (tail) return BN_VLD_N(p, r);
#endif
    (void)tail, (void)r;
    return BN_VLD(p);
}

/* Coefficient vector q of the elements at i (channel k); pre: the broadcast of a
 * BN_COEFS_ONE coefficient, made once before the loop. */
BN_ALWAYS_INLINE BN_V FN(ew_vcoef)(int op, int coef, int q, const BN_CT *p, BN_V pre,
                                   ptrdiff_t i, ptrdiff_t k, int tail, ptrdiff_t r)
{
    if (!BN_EW_USES(op, q) || coef == BN_COEFS_ONE) return pre;
    /* the wrapped arrays hold a whole vector from any channel */
    if (coef == BN_COEFS_WRAPPED) return BN_VLDC(p + k);
#if BN_VMASK
    if (tail) return BN_VLD_N(p + i, r);
#endif
    (void)tail, (void)r;
    return BN_VLDC(p + i);
}

/* The vector at element i, channel k; with `tail` (BN_VMASK), its first r lanes. */
BN_ALWAYS_INLINE BN_V FN(ew_vec)(int op, int coef, const BN_T *x, const BN_T *dy,
                                 const BN_T *z, int relu, const unsigned char *mk,
                                 const BN_CT *pm, const BN_CT *pa, const BN_CT *pb,
                                 const BN_CT *pc, BN_V vm, BN_V va, BN_V vb, BN_V vc,
                                 ptrdiff_t i, ptrdiff_t k, int tail, ptrdiff_t r)
{
    BN_V m = FN(ew_vcoef)(op, coef, 0, pm, vm, i, k, tail, r);
    BN_V a = FN(ew_vcoef)(op, coef, 1, pa, va, i, k, tail, r);
    BN_V b = FN(ew_vcoef)(op, coef, 2, pb, vb, i, k, tail, r);
    BN_V c = FN(ew_vcoef)(op, coef, 3, pc, vc, i, k, tail, r);
    BN_V t;
    if (op == BN_OP_SCALE) return BN_VMUL(a, FN(vld_r)(dy + i, tail, r));
    if (op == BN_OP_AFFINE) {
        t = BN_VFMA(BN_VSUB(FN(vld_r)(x + i, tail, r), m), a, b);
        if (z) t = BN_VADD(t, FN(vld_r)(z + i, tail, r));
        /* max(0, t) is t when t is NaN or -0, as epi's relu: the same bits */
        return relu ? BN_VMAX(BN_VSET1(0), t) : t;
    }
    t = BN_VFMA(BN_VSUB(FN(vld_r)(x + i, tail, r), m), b, c);
#if BN_VMASK
    if (mk && tail) t = FN(vkeep_n)(t, mk + i, r);
    else
#endif
        if (mk) t = FN(vkeep)(t, mk + i);
    return BN_VFMA(a, FN(vld_r)(dy + i, tail, r), t);
}

#endif

/* Strided elements (no mask, no wrapped coefficients), as written, one at a time: the rare
 * path, kept out of line so that it adds nothing to the callers' loops. */
static void FN(elementwise_strided)(int op, int coef, ptrdiff_t n, ptrdiff_t c0, const BN_T *x,
                                    ptrdiff_t xst, const BN_T *dy, ptrdiff_t dyst, const BN_T *z,
                                    ptrdiff_t zst, int relu, BN_T *out, ptrdiff_t ost,
                                    const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                    const BN_CT *c)
{
    const BN_CT sm = BN_EW_ONE_COEF(op, coef, 0, m, c0), sa = BN_EW_ONE_COEF(op, coef, 1, a, c0);
    const BN_CT sb = BN_EW_ONE_COEF(op, coef, 2, b, c0), sc = BN_EW_ONE_COEF(op, coef, 3, c, c0);
    ptrdiff_t i;
    for (i = 0; i < n; ++i)
        BN_ST(out + i * ost,
              FN(ew_one)(op, 0, op != BN_OP_SCALE ? x + i * xst : NULL,
                         op != BN_OP_AFFINE ? dy + i * dyst : NULL, BN_ZAT(z, i, zst), relu, 1,
                         FN(ew_coef)(op, coef, 0, m, sm, i, 0),
                         FN(ew_coef)(op, coef, 1, a, sa, i, 0),
                         FN(ew_coef)(op, coef, 2, b, sb, i, 0),
                         FN(ew_coef)(op, coef, 3, c, sc, i, 0)));
}

BN_ALWAYS_INLINE void FN(elementwise)(int op, int coef, ptrdiff_t n, ptrdiff_t C, ptrdiff_t c0,
                                      const BN_T *x, ptrdiff_t xst, const BN_T *dy,
                                      ptrdiff_t dyst, const BN_T *z, ptrdiff_t zst, int relu,
                                      const unsigned char *mk, BN_T *out, ptrdiff_t ost,
                                      const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                      const BN_CT *c, int stream, int long_run)
{
    const int uses_x = op != BN_OP_SCALE, uses_dy = op != BN_OP_AFFINE;
    ptrdiff_t i = 0, k = 0; /* the element, and its channel with BN_COEFS_WRAPPED */
    const BN_CT sm = BN_EW_ONE_COEF(op, coef, 0, m, c0), sa = BN_EW_ONE_COEF(op, coef, 1, a, c0);
    const BN_CT sb = BN_EW_ONE_COEF(op, coef, 2, b, c0), sc = BN_EW_ONE_COEF(op, coef, 3, c, c0);
#define BN_EW_NEXT(k, step) (coef == BN_COEFS_WRAPPED ? BN_NEXT_CHANNEL(k, step, C) : 0)
#define BN_EW_ONE(fused, i, k)                                                                    \
    FN(ew_one)(op, fused, uses_x ? x + (i) : NULL, uses_dy ? dy + (i) : NULL, BN_ZAT(z, i, 1),    \
               relu, !mk || mk[i], FN(ew_coef)(op, coef, 0, m, sm, i, k),                         \
               FN(ew_coef)(op, coef, 1, a, sa, i, k), FN(ew_coef)(op, coef, 2, b, sb, i, k),      \
               FN(ew_coef)(op, coef, 3, c, sc, i, k))
    (void)stream, (void)C, (void)long_run;
    if ((!uses_x || xst == 1) && (!uses_dy || dyst == 1) && (!z || zst == 1) && ost == 1) {
#if BN_SIMD
        /* a run of one channel: its coefficients broadcast once */
        BN_V vm = BN_VSET1(sm), va = BN_VSET1(sa), vb = BN_VSET1(sb), vc = BN_VSET1(sc);
#define BN_EW_VEC(i, tail, r)                                                                     \
    FN(ew_vec)(op, coef, x, dy, z, relu, mk, m, a, b, c, vm, va, vb, vc, i, k, tail, r)
        stream = stream && BN_CAN_STREAM;
        if (long_run && BN_MISALIGNED(out) % sizeof(BN_T) == 0) { /* see BN_ALIGNS_RUN */
#if BN_VMASK
            if (BN_MISALIGNED(out)) {
                ptrdiff_t h = BN_TO_BOUNDARY(out);
                BN_VST_N(out, BN_EW_VEC(0, 1, h), h);
                i = h, BN_EW_NEXT(k, h);
            }
#else
            for (; i < n && BN_MISALIGNED(out + i); ++i, BN_EW_NEXT(k, 1))
                BN_ST(out + i, BN_EW_ONE(1, i, k));
#endif
        }
        for (; stream && i < n && BN_MISALIGNED(out + i); ++i, BN_EW_NEXT(k, 1))
            BN_ST(out + i, BN_EW_ONE(1, i, k));
        if (long_run && coef != BN_COEFS_WRAPPED && i + 8 * BN_W <= n) {
            /* four vectors read before the four before them are stored: a load whose
             * address shares its low 12 bits with an older pending store waits for it (4K
             * aliasing), so with out a few lines ahead of x in its page each load waited
             * for the store just before it; a load placed before that store in program
             * order does not. (256, 1024), out at every 64-byte offset from x: the slowest
             * over the fastest went from 1.26-1.30x to 1.07-1.11x (inference), 1.10x to
             * 1.03x (training), 1.09x to 1.04x (backward), at the same best time. */
            BN_V p0 = BN_EW_VEC(i, 0, 0), p1 = BN_EW_VEC(i + BN_W, 0, 0);
            BN_V p2 = BN_EW_VEC(i + 2 * BN_W, 0, 0), p3 = BN_EW_VEC(i + 3 * BN_W, 0, 0);
            for (; i + 8 * BN_W <= n; i += 4 * BN_W) {
                BN_V q0 = BN_EW_VEC(i + 4 * BN_W, 0, 0), q1 = BN_EW_VEC(i + 5 * BN_W, 0, 0);
                BN_V q2 = BN_EW_VEC(i + 6 * BN_W, 0, 0), q3 = BN_EW_VEC(i + 7 * BN_W, 0, 0);
                BN_VSTS(stream, out + i, p0), BN_VSTS(stream, out + i + BN_W, p1);
                BN_VSTS(stream, out + i + 2 * BN_W, p2), BN_VSTS(stream, out + i + 3 * BN_W, p3);
                p0 = q0, p1 = q1, p2 = q2, p3 = q3;
            }
            BN_VSTS(stream, out + i, p0), BN_VSTS(stream, out + i + BN_W, p1);
            BN_VSTS(stream, out + i + 2 * BN_W, p2), BN_VSTS(stream, out + i + 3 * BN_W, p3);
            i += 4 * BN_W;
        }
        if (op == BN_OP_AFFINE && coef == BN_COEFS_ONE) /* two vectors a step */
            for (; i + 2 * BN_W <= n; i += 2 * BN_W) {
                BN_V y0 = BN_EW_VEC(i, 0, 0), y1 = BN_EW_VEC(i + BN_W, 0, 0);
                BN_VSTS(stream, out + i, y0), BN_VSTS(stream, out + i + BN_W, y1);
            }
        for (; i + BN_W <= n; i += BN_W, BN_EW_NEXT(k, BN_W))
            BN_VSTS(stream, out + i, BN_EW_VEC(i, 0, 0));
#if BN_VMASK
        if (i < n)
            BN_VST_N(out + i, BN_EW_VEC(i, 1, n - i), n - i);
        i = n;
#endif
        for (; i < n; ++i, BN_EW_NEXT(k, 1)) BN_ST(out + i, BN_EW_ONE(1, i, k));
#undef BN_EW_VEC
#endif
        for (; i < n; ++i, BN_EW_NEXT(k, 1)) BN_ST(out + i, BN_EW_ONE(0, i, k));
    } else {
        FN(elementwise_strided)(op, coef, n, c0, x, xst, dy, dyst, z, zst, relu, out, ost, m, a,
                                b, c);
    }
#undef BN_EW_ONE
#undef BN_EW_NEXT
}

#if BN_SIMD
/* Paths for 512-bit vectors only (BN_V512_PATHS): FN(ew_row_pair) and FN(ew_planar_row).
 * Each 512-bit access costs a load slot of its own, two where it straddles a cache line;
 * with AVX2 the row pairs made (4096, 64) 7-15% slower (two 256-bit loads a cycle: the
 * loads were not the bound). */
#define BN_V512_PATHS (BN_VBYTES == 64)
#if BN_V512_PATHS

/* Two rows of a run across n channels (unit strides, no mask, ordinary stores), their
 * whole vectors, each column's coefficient vectors loaded once for both rows: a row alone
 * loads up to four coefficient vectors for each of its vectors, and on cores that take one
 * 512-bit load a cycle those loads bound the loop. The same arithmetic, lane by lane, as FN(elementwise). One
 * thread, (4096, 64) float32 inference 43 -> 39 us, backward 100 -> 93, (64, 128) 3-4%
 * faster. */
BN_ALWAYS_INLINE void FN(ew_row_pair)(int op, ptrdiff_t n, const BN_T *x0, const BN_T *x1,
                                      const BN_T *dy0, const BN_T *dy1, const BN_T *z0,
                                      const BN_T *z1, int relu, BN_T *out0, BN_T *out1,
                                      const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                      const BN_CT *c)
{
    const BN_V zero = BN_VSET1(0);
    ptrdiff_t j;
    for (j = 0; j + BN_W <= n; j += BN_W) {
        BN_V cm = BN_EW_USES(op, 0) ? BN_VLDC(m + j) : zero;
        BN_V ca = BN_EW_USES(op, 1) ? BN_VLDC(a + j) : zero;
        BN_V cb = BN_EW_USES(op, 2) ? BN_VLDC(b + j) : zero;
        BN_V cc = BN_EW_USES(op, 3) ? BN_VLDC(c + j) : zero;
        BN_V y0 = FN(ew_vec)(op, BN_COEFS_ONE, x0, dy0, z0, relu, NULL, m, a, b, c, cm, ca, cb,
                             cc, j, 0, 0, 0);
        BN_V y1 = FN(ew_vec)(op, BN_COEFS_ONE, x1, dy1, z1, relu, NULL, m, a, b, c, cm, ca, cb,
                             cc, j, 0, 0, 0);
        BN_VST(out0 + j, y0), BN_VST(out1 + j, y1);
    }
    if (j < n) { /* each row's last columns, with the driver's tail */
#define BN_RP_AT(p, j) ((p) ? (p) + (j) : (p))
        FN(elementwise)(op, BN_COEFS_EACH, n - j, 1, 0, BN_RP_AT(x0, j), 1, BN_RP_AT(dy0, j), 1,
                        BN_RP_AT(z0, j), 1, relu, NULL, out0 + j, 1, BN_RP_AT(m, j),
                        BN_RP_AT(a, j), BN_RP_AT(b, j), BN_RP_AT(c, j), 0, 0);
        FN(elementwise)(op, BN_COEFS_EACH, n - j, 1, 0, BN_RP_AT(x1, j), 1, BN_RP_AT(dy1, j), 1,
                        BN_RP_AT(z1, j), 1, relu, NULL, out1 + j, 1, BN_RP_AT(m, j),
                        BN_RP_AT(a, j), BN_RP_AT(b, j), BN_RP_AT(c, j), 0, 0);
#undef BN_RP_AT
    }
}

/* A planar row: cn channels' runs of len elements each (len a multiple of BN_W), one after
 * the other in x, dy, z and out (unit strides), out not on a vector boundary. Written in
 * vectors aligned to out after a masked head, each channel's last vector taking its last
 * lanes' coefficients from the next channel (one blend per coefficient and channel): runs
 * of a few vectors (8x8 images) otherwise straddle a cache line with every access where
 * NumPy puts its arrays (16 bytes into a line). The same arithmetic, lane by lane, as
 * FN(elementwise) with BN_COEFS_ONE. One thread, (8, 32, 8, 8) float32 at NumPy's
 * offset: training forward 3.9 -> 3.5 us, inference 1.7 -> 1.3, backward 5.8 -> 4.9;
 * (64, 8, 4, 4) inference 1.7 -> 1.1, backward 4.7 -> 3.1. */
BN_ALWAYS_INLINE void FN(ew_planar_row)(int op, ptrdiff_t cn, ptrdiff_t len, const BN_T *x,
                                        const BN_T *dy, const BN_T *z, int relu, BN_T *out,
                                        const BN_CT *m, const BN_CT *a, const BN_CT *b,
                                        const BN_CT *c)
{
    const ptrdiff_t h = BN_TO_BOUNDARY(out);
    const BN_V zero = BN_VSET1(0);
    ptrdiff_t i, k;
#define BN_PR_COEF(q, p, k) (BN_EW_USES(op, q) ? BN_VSET1((p)[k]) : zero)
    BN_V vm = BN_PR_COEF(0, m, 0), va = BN_PR_COEF(1, a, 0), vb = BN_PR_COEF(2, b, 0);
    BN_V vc = BN_PR_COEF(3, c, 0);
#define BN_PR_VEC(i, tail, r)                                                                     \
    FN(ew_vec)(op, BN_COEFS_ONE, x, dy, z, relu, NULL, m, a, b, c, vm, va, vb, vc, i, 0, tail, r)
    BN_VST_N(out, BN_PR_VEC(0, 1, h), h);
    for (i = h, k = 0; k < cn; ++k) {
        const ptrdiff_t end = (k + 1) * len;
        for (; i + BN_W <= end; i += BN_W) BN_VST(out + i, BN_PR_VEC(i, 0, 0));
        if (k + 1 == cn) { /* the row's last W - h elements */
            BN_VST_N(out + i, BN_PR_VEC(i, 1, end - i), end - i);
            break;
        }
        {
            BN_V nm = BN_PR_COEF(0, m, k + 1), na = BN_PR_COEF(1, a, k + 1);
            BN_V nb = BN_PR_COEF(2, b, k + 1), nc = BN_PR_COEF(3, c, k + 1);
            BN_V bm = BN_VBLEND_LAST(vm, nm, h), ba = BN_VBLEND_LAST(va, na, h);
            BN_V bb = BN_VBLEND_LAST(vb, nb, h), bc = BN_VBLEND_LAST(vc, nc, h);
            BN_VST(out + i, FN(ew_vec)(op, BN_COEFS_ONE, x, dy, z, relu, NULL, m, a, b, c, bm,
                                       ba, bb, bc, i, 0, 0, 0));
            i += BN_W;
            vm = nm, va = na, vb = nb, vc = nc;
        }
    }
#undef BN_PR_VEC
#undef BN_PR_COEF
}
#endif /* BN_V512_PATHS */
#endif /* BN_SIMD */

/* Rows across channels (BN_COEFS_EACH) of at least BN_ALIGN_MIN_RUN vectors are written
 * with the driver's `long_run`: the elements before out's first vector boundary first (one
 * masked vector, or scalars; the same arithmetic as the lanes), so that the rest of the
 * row's stores, and its loads where x, dy and the coefficient arrays lie alike
 * (alloc_coefs), never straddle two cache lines. NumPy puts arrays of 128 KB and more 16
 * bytes into a page, where every 512-bit access and every other 256-bit one straddles two:
 * on (256, 1024) float32 there (one thread) the training forward took 87 -> 75 us with
 * AVX-512 and 100-107 -> 83-86 with AVX2, inference 32 -> 27-28. Callers choose once per
 * unit (affine_rows, dx_rows), so shorter rows keep their loops as they were; a test inside
 * the loops, or a head on planar runs, made small shapes 10-20% slower. */
#define BN_ALIGN_MIN_RUN 16
#if BN_SIMD
#define BN_ALIGNS_RUN(n) ((n) >= BN_ALIGN_MIN_RUN * BN_W)
#else
#define BN_ALIGNS_RUN(n) 0
#endif
/* The coefficient arrays (`arrays` of them, BN_COEF_STRIDE(C) apart) of passes writing
 * `out`; free_coefs with the same C frees them. With rows long enough for the head (see
 * BN_ALIGNS_RUN) they start at out's offset within a cache line, so that a row's
 * coefficient loads are aligned with its stores (all arrays, when C is a multiple of 16),
 * and half a page from out, so that they never alias its pending stores modulo 4 KB (on
 * (256, 1024), within 128 bytes after out or 64 before it, calls took 1.1-1.3x as long as
 * at 0.5-3.5 KB). Otherwise from malloc, as before: with one allocator for both (aligned to
 * a line), rows of 128 channels took 1.07-1.10x as long, the other placements tried 1.1-1.4x
 * (where x and out lie 16 bytes into a page). */
static inline BN_CT *FN(alloc_coefs)(int arrays, ptrdiff_t C, const void *out)
{
    size_t bytes = sizeof(BN_CT) * (size_t)arrays * (size_t)BN_COEF_STRIDE(C);
    if (BN_ALIGNS_RUN(C)) return (BN_CT *)bn_alloc_at(bytes, ((uintptr_t)out + 2048) % 4096);
    return (BN_CT *)malloc(bytes);
}

static inline void FN(free_coefs)(BN_CT *coef, ptrdiff_t C)
{
    (void)C;
    if (BN_ALIGNS_RUN(C))
        bn_free_aligned(coef);
    else
        free(coef);
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
            const bn_d16 one = bn_d16_set1(1.0);
            for (r = r0; r < r1; ++r) {
                bn_d16 e = bn_d16_sub(BN_LOAD16D(x + r * rs + j), vm);
                vs = bn_d16_sum(vs, e, one), vq = bn_d16_fma(e, e, vq);
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
