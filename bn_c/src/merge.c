/* Deterministic merges of the parts' results, channel block by block, parts in order:
 * the same bits for any number of threads. Compiled once, shared by every ISA. */
#include "unit.h"

#include <math.h>

/* A block's channels are merged side by side: the part counts, and so the merge weights, are
 * the same for every channel, and independent channels keep the FPU busy where one channel's
 * chain of dependent steps would wait on each. Each channel's arithmetic, and so its bits, is
 * that of merging it alone, parts in order. */
void bn_merge_moments(const bn_tiling *t, bn_shape s, const double *pmean, const double *pm2,
                      const double *pcount, double *mean, double *var, ptrdiff_t c0,
                      ptrdiff_t nc)
{
    ptrdiff_t j, k, P = t->parts, S = BN_PART_STRIDE(t->c_count);
    const double *pm = pmean + c0, *p2 = pm2 + c0;
    double n = 0.0, m[BN_MERGE_BLOCK_MAX], m2[BN_MERGE_BLOCK_MAX];
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

void bn_merge_sums(const bn_tiling *t, const double *part, double *total, ptrdiff_t c0,
                   ptrdiff_t nc)
{
    ptrdiff_t j, k, P = t->parts, S = BN_PART_STRIDE(t->c_count);
    double acc[BN_MERGE_BLOCK_MAX];
    for (j = 0; j < nc; ++j) acc[j] = 0.0;
    for (k = 0; k < P; ++k)
        for (j = 0; j < nc; ++j) acc[j] += part[k * S + c0 + j];
    for (j = 0; j < nc; ++j) total[c0 + j] = acc[j];
}
