# Cython interface to the C core, for other Cython code:
#
#     from batchnorm cimport _kernels
#     rc = _kernels.forward_train_f32(x3, y3, gamma, beta, 1e-5, mean, var)
#
# Arrays are (outer, channels, inner) views with any strides; statistics and parameters are
# contiguous float64 vectors of length `channels` (a None gamma/beta means 1/0). Every function
# releases nothing itself and may be called without the GIL; it returns 0, or a negative code
# (-1 bad argument, -2 out of memory) that `check` turns into an exception.

cdef int stats_f32(const float[:, :, :] x,
                   double[::1] mean, double[::1] var) noexcept nogil
cdef int stats_f64(const double[:, :, :] x,
                   double[::1] mean, double[::1] var) noexcept nogil

cdef int forward_train_f32(const float[:, :, :] x, float[:, :, :] y,           # IN, OUT
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil   # OUT
cdef int forward_train_f64(const double[:, :, :] x, double[:, :, :] y,
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil

cdef int forward_eval_f32(const float[:, :, :] x, float[:, :, :] y,
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil
cdef int forward_eval_f64(const double[:, :, :] x, double[:, :, :] y,
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil

cdef int backward_f32(const float[:, :, :] dy, const float[:, :, :] x, float[:, :, :] dx,
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil
cdef int backward_f64(const double[:, :, :] dy, const double[:, :, :] x, double[:, :, :] dx,
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil
