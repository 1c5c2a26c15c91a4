/*
 * batchnorm C core: batch statistics, normalization and gradients on a strided
 * (outer, channels, inner) view of an array. No Python dependency.
 *
 * Statistics of channel c are taken over the outer * inner elements of slice [:, c, :].
 * Strides are in elements (not bytes) and may be negative or zero for inputs.
 * Statistics and parameters are float64 arrays of length `channels`; a NULL gamma means
 * scale 1 and a NULL beta means shift 0.
 *
 * Results are deterministic: bit-identical for any number of threads.
 * Every function returns BN_OK or a negative BN_ERR_* code.
 */
#ifndef BN_BN_H
#define BN_BN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BN_OK 0
#define BN_ERR_ARG (-1)   /* a size is negative, or a required pointer is NULL */
#define BN_ERR_NOMEM (-2) /* scratch space for the partial sums could not be allocated */
#define BN_ERR_ISA (-3)   /* bn_set_isa: unknown name, or an ISA this CPU/build cannot run */

typedef struct bn_shape {
    ptrdiff_t outer, channels, inner;
} bn_shape;

typedef struct bn_strides {
    ptrdiff_t outer, channel, inner; /* in elements */
} bn_strides;

/* The variants of a call, all optional: a NULL bn_options (or one zero-filled) is plain batch
 * normalization. Arrays are typed as the call's x (float, double, or uint16_t half bits).
 *
 * mask (stats, forward_train, backward): one byte per (outer, inner) position, strides in
 *   bytes (mask_strides.channel must be 0: a position counts for every channel or none).
 *   Statistics are taken over the positions whose byte is nonzero (count: their number);
 *   every position is still normalized with them; the training backward is the exact
 *   gradient of that function (masked positions get dx = dy * gamma / sqrt(var + eps)).
 * residual, activation (forward_train, forward_eval): the epilogue y = act(bn(x) + residual),
 *   computed in the pass that writes y. residual may be NULL (no sum).
 * activation with y and dz (backward): dz = dy where the forward's output y > 0 (else 0; NaN
 *   passes, as PyTorch's threshold_backward does) is written, and the gradients are those of
 *   batch normalization with dz as the upstream gradient. dz must not overlap dy, x or y;
 *   dx may be dz. */
#define BN_ACT_NONE 0
#define BN_ACT_RELU 1
typedef struct bn_options {
    const unsigned char *mask;
    bn_strides mask_strides;
    const void *residual;
    bn_strides residual_strides;
    int activation;
    const void *y; /* backward with an activation: the forward's output */
    bn_strides y_strides;
    void *dz;
    bn_strides dz_strides;
} bn_options;

/* mean and biased var (length channels) over count = outer * inner values per channel (with
 * a mask: the unmasked ones; a channel with none gets NaN). */
int bn_stats_f32(bn_shape s, const float *x, bn_strides xs, double *mean, double *var,
                 const bn_options *opt);
int bn_stats_f64(bn_shape s, const double *x, bn_strides xs, double *mean, double *var,
                 const bn_options *opt);

/* Training forward: mean/var <- batch statistics of x, y <- gamma*(x-mean)/sqrt(var+eps)+beta.
 * y may be x itself (same strides): every element is read before it is written. So may the
 * residual. */
int bn_forward_train_f32(bn_shape s, const float *x, bn_strides xs, float *y, bn_strides ys,
                         const double *gamma, const double *beta, double eps, double *mean,
                         double *var, const bn_options *opt);
int bn_forward_train_f64(bn_shape s, const double *x, bn_strides xs, double *y, bn_strides ys,
                         const double *gamma, const double *beta, double eps, double *mean,
                         double *var, const bn_options *opt);

/* Inference forward with given statistics: y <- gamma*(x-mean)/sqrt(var+eps)+beta. */
int bn_forward_eval_f32(bn_shape s, const float *x, bn_strides xs, float *y, bn_strides ys,
                        const double *mean, const double *var, const double *gamma,
                        const double *beta, double eps, const bn_options *opt);
int bn_forward_eval_f64(bn_shape s, const double *x, bn_strides xs, double *y, bn_strides ys,
                        const double *mean, const double *var, const double *gamma,
                        const double *beta, double eps, const bn_options *opt);

/* Backward. dgamma = sum dy*xhat, dbeta = sum dy (either may be NULL).
 * training != 0: dx = gamma/sqrt(var+eps) * (dy - dbeta/n - xhat*dgamma/n), where mean/var
 *                must be the batch statistics of x;
 * training == 0: dx = dy * gamma/sqrt(var+eps) (frozen statistics).
 * dx may be NULL (only the parameter gradients), or dy itself (same strides). */
int bn_backward_f32(bn_shape s, const float *dy, bn_strides dys, const float *x, bn_strides xs,
                    float *dx, bn_strides dxs, const double *mean, const double *var,
                    const double *gamma, double eps, int training, double *dgamma,
                    double *dbeta, const bn_options *opt);
int bn_backward_f64(bn_shape s, const double *dy, bn_strides dys, const double *x,
                    bn_strides xs, double *dx, bn_strides dxs, const double *mean,
                    const double *var, const double *gamma, double eps, int training,
                    double *dgamma, double *dbeta, const bn_options *opt);

/* Training backward of a batch split into parts (one per process, SyncBatchNorm): dx of this
 * part, as bn_backward with training != 0 computes it, but from the sums over the whole batch
 * and its count n (per channel) instead of those of x alone. sum_dy and sum_dy_xhat are the
 * dbeta and dgamma of each part (bn_backward with training == 0 and the whole batch's
 * mean/var), added up over the parts. n >= 1; dx may be dy itself (same strides). */
int bn_backward_total_f32(bn_shape s, const float *dy, bn_strides dys, const float *x,
                          bn_strides xs, float *dx, bn_strides dxs, const double *mean,
                          const double *var, const double *gamma, double eps, double n,
                          const double *sum_dy, const double *sum_dy_xhat);
int bn_backward_total_f64(bn_shape s, const double *dy, bn_strides dys, const double *x,
                          bn_strides xs, double *dx, bn_strides dxs, const double *mean,
                          const double *var, const double *gamma, double eps, double n,
                          const double *sum_dy, const double *sum_dy_xhat);

/* Half precision storage, as raw 16-bit patterns: float16 (IEEE binary16) and bfloat16.
 * Computed in float32 with float64 statistics; same semantics as the functions above. */
int bn_stats_f16(bn_shape s, const uint16_t *x, bn_strides xs, double *mean, double *var,
                 const bn_options *opt);
int bn_stats_bf16(bn_shape s, const uint16_t *x, bn_strides xs, double *mean, double *var,
                  const bn_options *opt);
int bn_forward_train_f16(bn_shape s, const uint16_t *x, bn_strides xs, uint16_t *y,
                         bn_strides ys, const double *gamma, const double *beta, double eps,
                         double *mean, double *var, const bn_options *opt);
int bn_forward_train_bf16(bn_shape s, const uint16_t *x, bn_strides xs, uint16_t *y,
                          bn_strides ys, const double *gamma, const double *beta, double eps,
                          double *mean, double *var, const bn_options *opt);
int bn_forward_eval_f16(bn_shape s, const uint16_t *x, bn_strides xs, uint16_t *y,
                        bn_strides ys, const double *mean, const double *var,
                        const double *gamma, const double *beta, double eps,
                        const bn_options *opt);
int bn_forward_eval_bf16(bn_shape s, const uint16_t *x, bn_strides xs, uint16_t *y,
                         bn_strides ys, const double *mean, const double *var,
                         const double *gamma, const double *beta, double eps,
                         const bn_options *opt);
int bn_backward_f16(bn_shape s, const uint16_t *dy, bn_strides dys, const uint16_t *x,
                    bn_strides xs, uint16_t *dx, bn_strides dxs, const double *mean,
                    const double *var, const double *gamma, double eps, int training,
                    double *dgamma, double *dbeta, const bn_options *opt);
int bn_backward_bf16(bn_shape s, const uint16_t *dy, bn_strides dys, const uint16_t *x,
                     bn_strides xs, uint16_t *dx, bn_strides dxs, const double *mean,
                     const double *var, const double *gamma, double eps, int training,
                     double *dgamma, double *dbeta, const bn_options *opt);
int bn_backward_total_f16(bn_shape s, const uint16_t *dy, bn_strides dys, const uint16_t *x,
                          bn_strides xs, uint16_t *dx, bn_strides dxs, const double *mean,
                          const double *var, const double *gamma, double eps, double n,
                          const double *sum_dy, const double *sum_dy_xhat);
int bn_backward_total_bf16(bn_shape s, const uint16_t *dy, bn_strides dys, const uint16_t *x,
                           bn_strides xs, uint16_t *dx, bn_strides dxs, const double *mean,
                           const double *var, const double *gamma, double eps, double n,
                           const double *sum_dy, const double *sum_dy_xhat);

/* Threads: n <= 0 restores the default (OpenMP's, which honours OMP_NUM_THREADS). Requests
 * are capped at bn_max_threads() (4 per processor, at least 16). After fork() the child runs
 * single-threaded until bn_set_num_threads is called in it: OpenMP's thread pool does not
 * survive a fork. */
void bn_set_num_threads(int n);
int bn_get_num_threads(void);
int bn_max_threads(void);
int bn_has_openmp(void);

/* Instruction set paths: "baseline", "avx2", "avx512". The active one is chosen once, at
 * first use, from the CPU and the BATCHNORM_ISA environment variable. */
const char *bn_active_isa(void);
int bn_isa_available(const char *name); /* compiled in and supported by this CPU */
int bn_set_isa(const char *name);       /* BN_OK or BN_ERR_ISA */

#ifdef __cplusplus
}
#endif
#endif
