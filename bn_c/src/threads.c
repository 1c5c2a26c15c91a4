/* How many threads a call uses: the thread policy (bn_threads_for), the user's setting, the
 * cap, and what a fork() does to it. Compiled once, shared by every ISA. */
#include "internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Work (elements times passes over them) below which a call runs on one thread: starting
 * and joining an OpenMP team costs a few microseconds, and on a busy machine a descheduled
 * thread stalls the whole call. Measured on the 2-core development machine (float32, C
 * harness, best of 3000): with 32768 elements a second thread made training backward
 * (3 passes) 15-25% faster and the forward (2 passes) 5-10% faster, but inference (1 pass)
 * 5-15% slower; at 65536 elements every operation gained 10-35%. Below that, a region
 * with two work-sharing loops (about 1 us there) costs what a second thread saves: the
 * 8192- and 16384-element backward split over both cores took 4.2 and 4.5 us against 3.4
 * and 4.9 on one (docs/performance.rst). */
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
