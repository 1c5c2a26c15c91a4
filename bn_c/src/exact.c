/* The exact double path of one element of a "wide" channel, whose coefficients do not fit
 * the compute type (see bn_call in internal.h). Compiled once, shared by every ISA. */
#include "internal.h"

#include <math.h>

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
