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



# --- fast paths -------------------------------------------------------------------------------
#
# The common call (a float32/float64 ndarray whose batch and spatial axes merge into one
# stride each, float64 parameter vectors, a fresh or disjoint output) handled here without the
# Python layer's generality: a few buffer look-ups, then one C call. Any other argument makes a
# fast_* function return None and the Python layer takes the general path, which also raises
# the errors; so the two paths cannot disagree on what is accepted.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_RECORDS_RO, PyBUF_RECORDS
from libc.math cimport isfinite

cdef object _ndarray = None
cdef object _empty_like = None
cdef object _empty = None
cdef object _stats_type = None


def init_fast_paths(ndarray, empty_like, empty, stats_type):
    """Called once by batchnorm._api: the NumPy callables and the Stats type for results."""
    global _ndarray, _empty_like, _empty, _stats_type
    _ndarray, _empty_like, _empty, _stats_type = ndarray, empty_like, empty, stats_type


cdef struct View3:
    char *ptr
    bn_shape s
    bn_strides st
    int is_f64
    char *lo    # first and one-past-last byte the view touches, for overlap checks
    char *hi


cdef bint merge_dims(Py_buffer *b, int start, int stop, Py_ssize_t *n,
                     Py_ssize_t *stride) noexcept:
    """Dimensions [start, stop) as one (size, byte stride), if their strides allow it."""
    cdef Py_ssize_t size = 1, inner_stride = 0, inner_len = 0
    cdef int i
    for i in range(stop - 1, start - 1, -1):        # innermost first
        if b.shape[i] == 1:
            continue
        if b.shape[i] == 0:
            n[0] = 0
            stride[0] = 0
            return True
        if inner_len and b.strides[i] != inner_stride * inner_len:
            return False
        if not inner_len:
            stride[0] = b.strides[i]
        inner_stride, inner_len = b.strides[i], b.shape[i]
        size *= b.shape[i]
    n[0] = size
    if size == 1:
        stride[0] = 0
    return True


cdef bint view3_of(Py_buffer *b, int axis, View3 *v) noexcept:
    """The (outer, C, inner) view of a float32/float64 buffer, if one exists."""
    cdef Py_ssize_t so = 0, si = 0, isz = b.itemsize, k
    cdef Py_ssize_t outer = 1, inner = 1
    cdef char *f = b.format
    if f[0] == b'=' or f[0] == b'@':
        f += 1
    if f[1] != 0 or (f[0] != b'f' and f[0] != b'd') or b.ndim < 2 or axis >= b.ndim:
        return False
    if not merge_dims(b, 0, axis, &outer, &so) or not merge_dims(b, axis + 1, b.ndim, &inner, &si):
        return False
    if so % isz or si % isz or b.strides[axis] % isz or (<size_t>b.buf) % isz:
        return False    # unaligned data: the general path copies it
    v.is_f64 = f[0] == b'd'
    v.ptr = <char *>b.buf
    v.s.outer, v.s.channels, v.s.inner = outer, b.shape[axis], inner
    v.st.outer, v.st.channel, v.st.inner = so // isz, b.strides[axis] // isz, si // isz
    v.lo = v.hi = v.ptr
    for k in range(b.ndim):
        if b.shape[k] == 0:
            v.hi = v.lo
            return True
        if b.strides[k] < 0:
            v.lo += b.strides[k] * (b.shape[k] - 1)
        else:
            v.hi += b.strides[k] * (b.shape[k] - 1)
    v.hi += isz
    return True


cdef inline bint disjoint_or_same(View3 *a, View3 *b) noexcept:
    return (a.hi <= b.lo or b.hi <= a.lo or
            (a.ptr == b.ptr and a.st.outer == b.st.outer and a.st.channel == b.st.channel
             and a.st.inner == b.st.inner))


cdef class _Buffers:
    """The buffers one fast call holds, released together."""
    cdef Py_buffer bufs[8]
    cdef int n

    cdef Py_buffer *get(self, object obj, int flags):
        """A buffer of obj (an exact ndarray), or NULL when it cannot be had."""
        if type(obj) is not _ndarray:
            return NULL
        try:
            PyObject_GetBuffer(obj, &self.bufs[self.n], flags)
        except (BufferError, ValueError):  # e.g. a writable buffer of a read-only array
            return NULL
        self.n += 1
        return &self.bufs[self.n - 1]

    cdef bint vector(self, object obj, Py_ssize_t C, const double **out):
        """obj as a contiguous float64 vector of length C (None is NULL), if it is one."""
        cdef Py_buffer *b
        if obj is None:
            out[0] = NULL
            return True
        b = self.get(obj, PyBUF_RECORDS_RO)
        if b == NULL or b.ndim != 1 or b.shape[0] != C or b.format[0] != b'd' \
                or b.format[1] != 0 or (C > 1 and b.strides[0] != 8) or (<size_t>b.buf) % 8:
            return False
        out[0] = <const double *>b.buf
        return True

    def __dealloc__(self):
        cdef int i
        for i in range(self.n):
            PyBuffer_Release(&self.bufs[i])


cdef inline int norm_axis(object axis, int ndim) except -2:
    """axis in [0, ndim), or -1 when it is not a plain int in range (the general path says why)."""
    cdef long a
    if type(axis) is not int:
        return -1
    a = axis
    if a < -ndim or a >= ndim:
        return -1
    return a + ndim if a < 0 else a


cdef inline bint eps_ok(object eps, double *e):
    if type(eps) is not float and type(eps) is not int:
        return False
    e[0] = eps
    return e[0] >= 0.0 and isfinite(e[0])


cdef object output_of(_Buffers held, object out, object like, int axis, View3 *x, View3 *y):
    """The output array and its view: fresh (shaped like `like`), or the caller's `out` when it
    matches and does not partly overlap x. None: leave it to the general path."""
    cdef Py_buffer *b
    result = _empty_like(like) if out is None else out
    b = held.get(result, PyBUF_RECORDS)
    if b == NULL or not view3_of(b, axis, y) or y.is_f64 != x.is_f64 \
            or y.s.outer != x.s.outer or y.s.channels != x.s.channels \
            or y.s.inner != x.s.inner or b.ndim != (<object>like).ndim:
        return None
    if out is not None and (out.shape != like.shape or not disjoint_or_same(x, y)):
        return None
    return result


def fast_batch_stats(x, axis):
    cdef _Buffers held = _Buffers()
    cdef View3 xv
    cdef Py_buffer *b = held.get(x, PyBUF_RECORDS_RO)
    cdef int ax, rc
    if b == NULL:
        return None
    ax = norm_axis(axis, b.ndim)
    if ax < 0 or not view3_of(b, ax, &xv) or xv.s.outer * xv.s.inner < 1 or xv.s.channels < 1:
        return None
    mean, var = _empty(xv.s.channels), _empty(xv.s.channels)
    rc = _stats_into(&xv, mean, var)
    check(rc)
    return _stats_type(mean, var, xv.s.outer * xv.s.inner)


cdef int _stats_into(View3 *xv, double[::1] mean, double[::1] var) except? -99:
    with nogil:
        if xv.is_f64:
            return bn_stats_f64(xv.s, <const double *>xv.ptr, xv.st, &mean[0], &var[0])
        return bn_stats_f32(xv.s, <const float *>xv.ptr, xv.st, &mean[0], &var[0])


def fast_forward_train(x, gamma, beta, axis, eps, out):
    cdef _Buffers held = _Buffers()
    cdef View3 xv, yv
    cdef Py_buffer *b = held.get(x, PyBUF_RECORDS_RO)
    cdef const double *g
    cdef const double *bt
    cdef double e = 0.0
    cdef double[::1] mean, var
    cdef int ax, rc
    if b == NULL:
        return None
    ax = norm_axis(axis, b.ndim)
    if ax < 0 or not view3_of(b, ax, &xv) or xv.s.outer * xv.s.inner < 2 or xv.s.channels < 1 \
            or not eps_ok(eps, &e):
        return None
    if not held.vector(gamma, xv.s.channels, &g) or not held.vector(beta, xv.s.channels, &bt):
        return None
    y = output_of(held, out, x, ax, &xv, &yv)
    if y is None:
        return None
    m, v = _empty(xv.s.channels), _empty(xv.s.channels)
    mean, var = m, v
    with nogil:
        if xv.is_f64:
            rc = bn_forward_train_f64(xv.s, <const double *>xv.ptr, xv.st, <double *>yv.ptr,
                                      yv.st, g, bt, e, &mean[0], &var[0])
        else:
            rc = bn_forward_train_f32(xv.s, <const float *>xv.ptr, xv.st, <float *>yv.ptr,
                                      yv.st, g, bt, e, &mean[0], &var[0])
    check(rc)
    return y, _stats_type(m, v, xv.s.outer * xv.s.inner)


def fast_forward_eval(x, mean, var, gamma, beta, axis, eps, out):
    cdef _Buffers held = _Buffers()
    cdef View3 xv, yv
    cdef Py_buffer *b = held.get(x, PyBUF_RECORDS_RO)
    cdef const double *m
    cdef const double *v
    cdef const double *g
    cdef const double *bt
    cdef double e = 0.0
    cdef Py_ssize_t c
    cdef int ax, rc
    if b == NULL:
        return None
    ax = norm_axis(axis, b.ndim)
    if ax < 0 or not view3_of(b, ax, &xv) or xv.s.channels < 1 or not eps_ok(eps, &e):
        return None
    C = xv.s.channels
    if not (held.vector(mean, C, &m) and held.vector(var, C, &v) and m != NULL and v != NULL
            and held.vector(gamma, C, &g) and held.vector(beta, C, &bt)):
        return None
    for c in range(xv.s.channels):
        if v[c] < 0:
            return None
    y = output_of(held, out, x, ax, &xv, &yv)
    if y is None:
        return None
    with nogil:
        if xv.is_f64:
            rc = bn_forward_eval_f64(xv.s, <const double *>xv.ptr, xv.st, <double *>yv.ptr,
                                     yv.st, m, v, g, bt, e)
        else:
            rc = bn_forward_eval_f32(xv.s, <const float *>xv.ptr, xv.st, <float *>yv.ptr,
                                     yv.st, m, v, g, bt, e)
    check(rc)
    return y


def fast_backward(dy, x, st, gamma, axis, eps, training, out):
    cdef _Buffers held = _Buffers()
    cdef View3 xv, gv, dv
    cdef Py_buffer *bx = held.get(x, PyBUF_RECORDS_RO)
    cdef Py_buffer *bg = held.get(dy, PyBUF_RECORDS_RO)
    cdef const double *m
    cdef const double *v
    cdef const double *g
    cdef double e = 0.0
    cdef double[::1] dgamma, dbeta
    cdef Py_ssize_t c
    cdef int ax, rc
    cdef bint train
    if bx == NULL or bg == NULL or type(st) is not _stats_type or type(training) is not bool:
        return None
    train = training
    ax = norm_axis(axis, bx.ndim)
    if ax < 0 or bg.ndim != bx.ndim or not view3_of(bx, ax, &xv) or not view3_of(bg, ax, &gv):
        return None
    if gv.is_f64 != xv.is_f64 or dy.shape != x.shape or not eps_ok(eps, &e):
        return None
    if train and xv.s.outer * xv.s.inner < 2:
        return None
    C = xv.s.channels
    if C < 1:
        return None
    if not (held.vector(st[0], C, &m) and held.vector(st[1], C, &v) and m != NULL
            and v != NULL and held.vector(gamma, C, &g)):
        return None
    for c in range(xv.s.channels):
        if v[c] < 0:
            return None
    dx = output_of(held, out, x, ax, &xv, &dv)
    if dx is None or (out is not None and not disjoint_or_same(&gv, &dv)):
        return None
    dg, db = _empty(C), _empty(C)
    dgamma, dbeta = dg, db
    with nogil:
        if xv.is_f64:
            rc = bn_backward_f64(xv.s, <const double *>gv.ptr, gv.st, <const double *>xv.ptr,
                                 xv.st, <double *>dv.ptr, dv.st, m, v, g, e, train,
                                 &dgamma[0], &dbeta[0])
        else:
            rc = bn_backward_f32(xv.s, <const float *>gv.ptr, gv.st, <const float *>xv.ptr,
                                 xv.st, <float *>dv.ptr, dv.st, m, v, g, e, train,
                                 &dgamma[0], &dbeta[0])
    check(rc)
    return dx, dg, db
