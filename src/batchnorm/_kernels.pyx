"""Typed-memoryview wrappers around the C core: one C call per operation, GIL released.

The Python API in ``batchnorm._api`` checks arguments and builds the (outer, C, inner) views;
these wrappers trust them. Other Cython code can ``cimport`` the typed functions (see
``_kernels.pxd``).
"""
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uint16_t

cdef extern from "bn/bn.h" nogil:
    ctypedef struct bn_shape:
        ptrdiff_t outer, channels, inner
    ctypedef struct bn_strides:
        ptrdiff_t outer, channel, inner
    int BN_OK, BN_ERR_ARG, BN_ERR_NOMEM, BN_ERR_ISA
    int bn_stats_f32(bn_shape, const float *, bn_strides, double *, double *)
    int bn_forward_train_f32(bn_shape, const float *, bn_strides, float *, bn_strides,
                             const double *, const double *, double, double *, double *)
    int bn_forward_eval_f32(bn_shape, const float *, bn_strides, float *, bn_strides,
                            const double *, const double *, const double *, const double *,
                            double)
    int bn_backward_f32(bn_shape, const float *, bn_strides, const float *, bn_strides,
                        float *, bn_strides, const double *, const double *, const double *,
                        double, int, double *, double *)
    int bn_stats_f64(bn_shape, const double *, bn_strides, double *, double *)
    int bn_forward_train_f64(bn_shape, const double *, bn_strides, double *, bn_strides,
                             const double *, const double *, double, double *, double *)
    int bn_forward_eval_f64(bn_shape, const double *, bn_strides, double *, bn_strides,
                            const double *, const double *, const double *, const double *,
                            double)
    int bn_backward_f64(bn_shape, const double *, bn_strides, const double *, bn_strides,
                        double *, bn_strides, const double *, const double *, const double *,
                        double, int, double *, double *)
    int bn_stats_f16(bn_shape, const uint16_t *, bn_strides, double *, double *)
    int bn_forward_train_f16(bn_shape, const uint16_t *, bn_strides, uint16_t *, bn_strides,
                             const double *, const double *, double, double *, double *)
    int bn_forward_eval_f16(bn_shape, const uint16_t *, bn_strides, uint16_t *, bn_strides,
                            const double *, const double *, const double *, const double *,
                            double)
    int bn_backward_f16(bn_shape, const uint16_t *, bn_strides, const uint16_t *, bn_strides,
                        uint16_t *, bn_strides, const double *, const double *, const double *,
                        double, int, double *, double *)
    int bn_stats_bf16(bn_shape, const uint16_t *, bn_strides, double *, double *)
    int bn_forward_train_bf16(bn_shape, const uint16_t *, bn_strides, uint16_t *, bn_strides,
                             const double *, const double *, double, double *, double *)
    int bn_forward_eval_bf16(bn_shape, const uint16_t *, bn_strides, uint16_t *, bn_strides,
                            const double *, const double *, const double *, const double *,
                            double)
    int bn_backward_bf16(bn_shape, const uint16_t *, bn_strides, const uint16_t *, bn_strides,
                        uint16_t *, bn_strides, const double *, const double *, const double *,
                        double, int, double *, double *)
    void bn_set_num_threads(int)
    int bn_get_num_threads()
    int bn_has_openmp()
    const char *bn_active_isa()
    int bn_isa_available(const char *)
    int bn_set_isa(const char *)

ISAS = ("baseline", "avx2", "avx512")


# --- views -> C structs -------------------------------------------------------------------

cdef inline bn_shape shape_of(Py_ssize_t *shape) noexcept nogil:
    cdef bn_shape s
    s.outer, s.channels, s.inner = shape[0], shape[1], shape[2]
    return s


cdef inline bn_strides strides_of(Py_ssize_t *strides, size_t itemsize) noexcept nogil:
    # Element strides; the Python layer only passes views whose byte strides are multiples of
    # the item size.
    cdef bn_strides st
    st.outer = strides[0] // <ptrdiff_t>itemsize
    st.channel = strides[1] // <ptrdiff_t>itemsize
    st.inner = strides[2] // <ptrdiff_t>itemsize
    return st


cdef inline bint empty(Py_ssize_t *shape) noexcept nogil:
    return shape[0] == 0 or shape[1] == 0 or shape[2] == 0


cdef inline const double *vec_or_null(const double[::1] v) noexcept nogil:
    return &v[0] if v is not None and v.shape[0] > 0 else NULL


cdef inline double *out_or_null(double[::1] v) noexcept nogil:
    return &v[0] if v is not None and v.shape[0] > 0 else NULL


# --- typed functions (cimportable) ---------------------------------------------------------

cdef int stats_f32(const float[:, :, :] x, double[::1] mean, double[::1] var) noexcept nogil:
    return bn_stats_f32(shape_of(x.shape), NULL if empty(x.shape) else <const float *>&x[0, 0, 0],
                        strides_of(x.strides, sizeof(float)), out_or_null(mean), out_or_null(var))


cdef int forward_train_f32(const float[:, :, :] x, float[:, :, :] y,
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil:
    if empty(x.shape):
        return stats_f32(x, mean, var)
    return bn_forward_train_f32(shape_of(x.shape), <const float *>&x[0, 0, 0],
                                strides_of(x.strides, sizeof(float)), <float *>&y[0, 0, 0],
                                strides_of(y.strides, sizeof(float)), vec_or_null(gamma),
                                vec_or_null(beta), eps, out_or_null(mean), out_or_null(var))


cdef int forward_eval_f32(const float[:, :, :] x, float[:, :, :] y,
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil:
    if empty(x.shape):
        return BN_OK
    return bn_forward_eval_f32(shape_of(x.shape), <const float *>&x[0, 0, 0],
                               strides_of(x.strides, sizeof(float)), <float *>&y[0, 0, 0],
                               strides_of(y.strides, sizeof(float)), vec_or_null(mean),
                               vec_or_null(var), vec_or_null(gamma), vec_or_null(beta), eps)


cdef int backward_f32(const float[:, :, :] dy, const float[:, :, :] x, float[:, :, :] dx,
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil:
    cdef bint none = empty(dy.shape)
    return bn_backward_f32(shape_of(dy.shape), NULL if none else <const float *>&dy[0, 0, 0],
                           strides_of(dy.strides, sizeof(float)),
                           NULL if none else <const float *>&x[0, 0, 0],
                           strides_of(x.strides, sizeof(float)),
                           NULL if none or dx is None else <float *>&dx[0, 0, 0],
                           strides_of(dx.strides, sizeof(float)) if dx is not None
                           else strides_of(dy.strides, sizeof(float)),
                           vec_or_null(mean), vec_or_null(var), vec_or_null(gamma), eps,
                           training, out_or_null(dgamma), out_or_null(dbeta))


cdef int stats_f64(const double[:, :, :] x, double[::1] mean, double[::1] var) noexcept nogil:
    return bn_stats_f64(shape_of(x.shape), NULL if empty(x.shape) else <const double *>&x[0, 0, 0],
                        strides_of(x.strides, sizeof(double)), out_or_null(mean), out_or_null(var))


cdef int forward_train_f64(const double[:, :, :] x, double[:, :, :] y,
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil:
    if empty(x.shape):
        return stats_f64(x, mean, var)
    return bn_forward_train_f64(shape_of(x.shape), <const double *>&x[0, 0, 0],
                                strides_of(x.strides, sizeof(double)), <double *>&y[0, 0, 0],
                                strides_of(y.strides, sizeof(double)), vec_or_null(gamma),
                                vec_or_null(beta), eps, out_or_null(mean), out_or_null(var))


cdef int forward_eval_f64(const double[:, :, :] x, double[:, :, :] y,
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil:
    if empty(x.shape):
        return BN_OK
    return bn_forward_eval_f64(shape_of(x.shape), <const double *>&x[0, 0, 0],
                               strides_of(x.strides, sizeof(double)), <double *>&y[0, 0, 0],
                               strides_of(y.strides, sizeof(double)), vec_or_null(mean),
                               vec_or_null(var), vec_or_null(gamma), vec_or_null(beta), eps)


cdef int backward_f64(const double[:, :, :] dy, const double[:, :, :] x, double[:, :, :] dx,
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil:
    cdef bint none = empty(dy.shape)
    return bn_backward_f64(shape_of(dy.shape), NULL if none else <const double *>&dy[0, 0, 0],
                           strides_of(dy.strides, sizeof(double)),
                           NULL if none else <const double *>&x[0, 0, 0],
                           strides_of(x.strides, sizeof(double)),
                           NULL if none or dx is None else <double *>&dx[0, 0, 0],
                           strides_of(dx.strides, sizeof(double)) if dx is not None
                           else strides_of(dy.strides, sizeof(double)),
                           vec_or_null(mean), vec_or_null(var), vec_or_null(gamma), eps,
                           training, out_or_null(dgamma), out_or_null(dbeta))


cdef int stats_f16(const unsigned short[:, :, :] x, double[::1] mean, double[::1] var) noexcept nogil:
    return bn_stats_f16(shape_of(x.shape), NULL if empty(x.shape) else <const uint16_t *>&x[0, 0, 0],
                        strides_of(x.strides, sizeof(unsigned short)), out_or_null(mean), out_or_null(var))


cdef int forward_train_f16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil:
    if empty(x.shape):
        return stats_f16(x, mean, var)
    return bn_forward_train_f16(shape_of(x.shape), <const uint16_t *>&x[0, 0, 0],
                                strides_of(x.strides, sizeof(unsigned short)), <uint16_t *>&y[0, 0, 0],
                                strides_of(y.strides, sizeof(unsigned short)), vec_or_null(gamma),
                                vec_or_null(beta), eps, out_or_null(mean), out_or_null(var))


cdef int forward_eval_f16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil:
    if empty(x.shape):
        return BN_OK
    return bn_forward_eval_f16(shape_of(x.shape), <const uint16_t *>&x[0, 0, 0],
                               strides_of(x.strides, sizeof(unsigned short)), <uint16_t *>&y[0, 0, 0],
                               strides_of(y.strides, sizeof(unsigned short)), vec_or_null(mean),
                               vec_or_null(var), vec_or_null(gamma), vec_or_null(beta), eps)


cdef int backward_f16(const unsigned short[:, :, :] dy, const unsigned short[:, :, :] x, unsigned short[:, :, :] dx,
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil:
    cdef bint none = empty(dy.shape)
    return bn_backward_f16(shape_of(dy.shape), NULL if none else <const uint16_t *>&dy[0, 0, 0],
                           strides_of(dy.strides, sizeof(unsigned short)),
                           NULL if none else <const uint16_t *>&x[0, 0, 0],
                           strides_of(x.strides, sizeof(unsigned short)),
                           NULL if none or dx is None else <uint16_t *>&dx[0, 0, 0],
                           strides_of(dx.strides, sizeof(unsigned short)) if dx is not None
                           else strides_of(dy.strides, sizeof(unsigned short)),
                           vec_or_null(mean), vec_or_null(var), vec_or_null(gamma), eps,
                           training, out_or_null(dgamma), out_or_null(dbeta))


cdef int stats_bf16(const unsigned short[:, :, :] x, double[::1] mean, double[::1] var) noexcept nogil:
    return bn_stats_bf16(shape_of(x.shape), NULL if empty(x.shape) else <const uint16_t *>&x[0, 0, 0],
                        strides_of(x.strides, sizeof(unsigned short)), out_or_null(mean), out_or_null(var))


cdef int forward_train_bf16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil:
    if empty(x.shape):
        return stats_bf16(x, mean, var)
    return bn_forward_train_bf16(shape_of(x.shape), <const uint16_t *>&x[0, 0, 0],
                                strides_of(x.strides, sizeof(unsigned short)), <uint16_t *>&y[0, 0, 0],
                                strides_of(y.strides, sizeof(unsigned short)), vec_or_null(gamma),
                                vec_or_null(beta), eps, out_or_null(mean), out_or_null(var))


cdef int forward_eval_bf16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil:
    if empty(x.shape):
        return BN_OK
    return bn_forward_eval_bf16(shape_of(x.shape), <const uint16_t *>&x[0, 0, 0],
                               strides_of(x.strides, sizeof(unsigned short)), <uint16_t *>&y[0, 0, 0],
                               strides_of(y.strides, sizeof(unsigned short)), vec_or_null(mean),
                               vec_or_null(var), vec_or_null(gamma), vec_or_null(beta), eps)


cdef int backward_bf16(const unsigned short[:, :, :] dy, const unsigned short[:, :, :] x, unsigned short[:, :, :] dx,
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil:
    cdef bint none = empty(dy.shape)
    return bn_backward_bf16(shape_of(dy.shape), NULL if none else <const uint16_t *>&dy[0, 0, 0],
                           strides_of(dy.strides, sizeof(unsigned short)),
                           NULL if none else <const uint16_t *>&x[0, 0, 0],
                           strides_of(x.strides, sizeof(unsigned short)),
                           NULL if none or dx is None else <uint16_t *>&dx[0, 0, 0],
                           strides_of(dx.strides, sizeof(unsigned short)) if dx is not None
                           else strides_of(dy.strides, sizeof(unsigned short)),
                           vec_or_null(mean), vec_or_null(var), vec_or_null(gamma), eps,
                           training, out_or_null(dgamma), out_or_null(dbeta))


# --- Python entry points (used by batchnorm._api) -----------------------------------------

cdef check(int rc):
    if rc == BN_ERR_NOMEM:
        raise MemoryError("batchnorm: could not allocate scratch space")
    if rc != BN_OK:
        raise ValueError(f"batchnorm: the C core rejected its arguments (code {rc})")


ctypedef fused storage:
    float
    double
    unsigned short   # float16 or bfloat16 bits: `bfloat16` tells which


def stats(const storage[:, :, :] x, double[::1] mean, double[::1] var, bint bfloat16=False):
    cdef int rc
    with nogil:
        if storage is float:
            rc = stats_f32(x, mean, var)
        elif storage is double:
            rc = stats_f64(x, mean, var)
        elif bfloat16:
            rc = stats_bf16(x, mean, var)
        else:
            rc = stats_f16(x, mean, var)
    check(rc)


def forward_train(const storage[:, :, :] x, storage[:, :, :] y, const double[::1] gamma,
                  const double[::1] beta, double eps, double[::1] mean, double[::1] var,
                  bint bfloat16=False):
    cdef int rc
    with nogil:
        if storage is float:
            rc = forward_train_f32(x, y, gamma, beta, eps, mean, var)
        elif storage is double:
            rc = forward_train_f64(x, y, gamma, beta, eps, mean, var)
        elif bfloat16:
            rc = forward_train_bf16(x, y, gamma, beta, eps, mean, var)
        else:
            rc = forward_train_f16(x, y, gamma, beta, eps, mean, var)
    check(rc)


def forward_eval(const storage[:, :, :] x, storage[:, :, :] y, const double[::1] mean,
                 const double[::1] var, const double[::1] gamma, const double[::1] beta,
                 double eps, bint bfloat16=False):
    cdef int rc
    with nogil:
        if storage is float:
            rc = forward_eval_f32(x, y, mean, var, gamma, beta, eps)
        elif storage is double:
            rc = forward_eval_f64(x, y, mean, var, gamma, beta, eps)
        elif bfloat16:
            rc = forward_eval_bf16(x, y, mean, var, gamma, beta, eps)
        else:
            rc = forward_eval_f16(x, y, mean, var, gamma, beta, eps)
    check(rc)


def backward(const storage[:, :, :] dy, const storage[:, :, :] x, storage[:, :, :] dx,
             const double[::1] mean, const double[::1] var, const double[::1] gamma,
             double eps, bint training, double[::1] dgamma, double[::1] dbeta,
             bint bfloat16=False):
    cdef int rc
    with nogil:
        if storage is float:
            rc = backward_f32(dy, x, dx, mean, var, gamma, eps, training, dgamma, dbeta)
        elif storage is double:
            rc = backward_f64(dy, x, dx, mean, var, gamma, eps, training, dgamma, dbeta)
        elif bfloat16:
            rc = backward_bf16(dy, x, dx, mean, var, gamma, eps, training, dgamma, dbeta)
        else:
            rc = backward_f16(dy, x, dx, mean, var, gamma, eps, training, dgamma, dbeta)
    check(rc)


def set_num_threads(int n):
    bn_set_num_threads(n)


def get_num_threads():
    return bn_get_num_threads()


def has_openmp():
    return bool(bn_has_openmp())


def active_isa():
    return bn_active_isa().decode()


def available_isas():
    return tuple(name for name in ISAS if bn_isa_available(name.encode()))


def set_isa(str name):
    if bn_set_isa(name.encode()) != BN_OK:
        raise ValueError(f"ISA {name!r} is not available here; available: {available_isas()}")
