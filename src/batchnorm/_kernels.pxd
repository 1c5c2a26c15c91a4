# Cython interface to the C core, for other Cython code:
#
#     from batchnorm cimport _kernels
#     rc = _kernels.forward_train_f32(x3, y3, gamma, beta, 1e-5, mean, var)
#
# Arrays are (outer, channels, inner) views with any strides; statistics and parameters are
# contiguous float64 vectors of length `channels` (a None gamma/beta means 1/0). float16 and
# bfloat16 data are passed as their raw 16-bit patterns (`x.view(numpy.uint16)`). Every
# function may be called without the GIL; it returns 0, or a negative code (-1 bad argument,
# -2 out of memory).

cdef int stats_f32(const float[:, :, :] x,                                     # IN
                   double[::1] mean, double[::1] var) noexcept nogil         # OUT
cdef int forward_train_f32(const float[:, :, :] x, float[:, :, :] y,           # IN, OUT
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil  # OUT
cdef int forward_eval_f32(const float[:, :, :] x, float[:, :, :] y,            # IN, OUT
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil
cdef int backward_f32(const float[:, :, :] dy, const float[:, :, :] x,         # IN
                      float[:, :, :] dx,                                        # OUT (or None)
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil  # OUT

cdef int stats_f64(const double[:, :, :] x,                                     # IN
                   double[::1] mean, double[::1] var) noexcept nogil         # OUT
cdef int forward_train_f64(const double[:, :, :] x, double[:, :, :] y,           # IN, OUT
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil  # OUT
cdef int forward_eval_f64(const double[:, :, :] x, double[:, :, :] y,            # IN, OUT
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil
cdef int backward_f64(const double[:, :, :] dy, const double[:, :, :] x,         # IN
                      double[:, :, :] dx,                                        # OUT (or None)
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil  # OUT

cdef int stats_f16(const unsigned short[:, :, :] x,                                     # IN
                   double[::1] mean, double[::1] var) noexcept nogil         # OUT
cdef int forward_train_f16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,           # IN, OUT
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil  # OUT
cdef int forward_eval_f16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,            # IN, OUT
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil
cdef int backward_f16(const unsigned short[:, :, :] dy, const unsigned short[:, :, :] x,         # IN
                      unsigned short[:, :, :] dx,                                        # OUT (or None)
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil  # OUT

cdef int stats_bf16(const unsigned short[:, :, :] x,                                     # IN
                   double[::1] mean, double[::1] var) noexcept nogil         # OUT
cdef int forward_train_bf16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,           # IN, OUT
                           const double[::1] gamma, const double[::1] beta, double eps,
                           double[::1] mean, double[::1] var) noexcept nogil  # OUT
cdef int forward_eval_bf16(const unsigned short[:, :, :] x, unsigned short[:, :, :] y,            # IN, OUT
                          const double[::1] mean, const double[::1] var,
                          const double[::1] gamma, const double[::1] beta,
                          double eps) noexcept nogil
cdef int backward_bf16(const unsigned short[:, :, :] dy, const unsigned short[:, :, :] x,         # IN
                      unsigned short[:, :, :] dx,                                        # OUT (or None)
                      const double[::1] mean, const double[::1] var,
                      const double[::1] gamma, double eps, bint training,
                      double[::1] dgamma, double[::1] dbeta) noexcept nogil  # OUT
