/* How a call's work is cut: shapes, tilings into units and parts, cache-sized chunks of
 * channels, and the cache-line-aligned scratch that holds the parts' results. Compiled once,
 * shared by every ISA. The cuts depend on the shape only, never on the threads. */
#include "unit.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The block malloc returned is kept just before the aligned pointer. */
#define BN_LINE 64

/* `bytes` at an address equal to `at` modulo `period` (a power of two), from a block with
 * room for that much padding. */
static void *bn_alloc_mod(size_t bytes, size_t at, size_t period)
{
    unsigned char *raw = (unsigned char *)malloc(bytes + period + sizeof(void *)), *p;
    if (!raw) return NULL;
    p = raw + sizeof(void *);
    p += ((uintptr_t)at - (uintptr_t)p) & (period - 1);
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    return p;
}

void *bn_alloc_aligned(size_t bytes) { return bn_alloc_mod(bytes, 0, BN_LINE); }

void *bn_alloc_at(size_t bytes, size_t at) { return bn_alloc_mod(bytes, at, 4096); }

void bn_free_aligned(void *p)
{
    void *raw;
    if (!p) return;
    memcpy(&raw, (unsigned char *)p - sizeof raw, sizeof raw);
    free(raw);
}

int bn_shape_ok(bn_shape s) { return s.outer >= 0 && s.channels >= 0 && s.inner >= 0; }

bn_tiling bn_make_tiling(bn_shape s, ptrdiff_t c_begin, ptrdiff_t c_count)
{
    bn_tiling t;
    t.planar = s.inner > 1;
    t.c_begin = c_begin, t.c_count = c_count;
    if (t.planar) {
        /* A unit is a run of whole channels of one row where it can be (contiguous memory
         * when the channels are; short inner runs one row apart are what the prefetchers
         * cannot follow), then several rows of those channels. Row blocks follow from the
         * whole shape, so a channel's pieces are the same for every channel range. */
        ptrdiff_t cb_full;
        t.ib = bn_min(s.inner, BN_UNIT_ELEMS);
        cb_full = t.ib == s.inner ? bn_max(1, BN_UNIT_ELEMS / t.ib) : 1;
        t.ob = bn_max(1, bn_min(s.outer, BN_UNIT_ELEMS / (bn_min(s.channels, cb_full) * t.ib)));
        t.cb = bn_max(1, bn_min(c_count, cb_full));
        t.n_cb = bn_ceil_div(c_count, t.cb);
    } else {
        /* Row blocks follow from the whole shape, so they are the same for every range. */
        t.ib = 1;
        t.ob = bn_max(1, bn_min(s.outer, BN_UNIT_ELEMS / bn_max(1, bn_min(s.channels, BN_MAX_CHANNEL_BLOCK))));
        t.cb = bn_max(1, bn_min(c_count, BN_MAX_CHANNEL_BLOCK));
        t.n_cb = bn_ceil_div(c_count, t.cb);
    }
    t.n_ib = bn_max(1, bn_ceil_div(s.inner, t.ib));
    t.n_ob = bn_max(1, bn_ceil_div(s.outer, t.ob));
    t.parts = t.n_ob * t.n_ib;
    t.units = t.parts * t.n_cb;
    return t;
}

bn_tiling bn_make_pass_tiling(bn_shape s, ptrdiff_t c_begin, ptrdiff_t c_count)
{
    bn_tiling t = bn_make_tiling(s, c_begin, c_count);
    if (!t.planar) {
        /* no partial results to keep per channel: a unit is a block of rows over all the
         * range's channels, one piece of memory when the channels are contiguous */
        t.cb = bn_max(1, c_count), t.n_cb = 1;
        t.ob = bn_max(1, bn_min(s.outer, BN_UNIT_ELEMS / t.cb));
        t.n_ob = bn_max(1, bn_ceil_div(s.outer, t.ob));
        t.parts = t.n_ob, t.units = t.n_ob;
    }
    return t;
}

/* Bytes of a chunk: small enough that a chunk stays in the last-level cache (32 MB on the
 * 2-core machine) beside the output being written and the other threads' data, large enough
 * to hold many work units for the threads: 4 MB, or 1 MB per thread on many cores. On the
 * 16-core device machine (float32, 16 threads, best of two runs) 1 MB per thread took the
 * training forward of 32x64x56x56 from 0.40 to 0.31 ms and its backward from 0.58 to 0.43
 * (64x128x56x56: 2.9 to 2.2 ms), and channels-last shapes within 2% either way; 2 MB per
 * thread was no better. Chunks never change results: a channel's pieces do not depend on
 * them. */
#ifndef BN_CHUNK_BYTES
#define BN_CHUNK_BYTES ((size_t)4 << 20)
#endif
#ifndef BN_CHUNK_BYTES_PER_THREAD
#define BN_CHUNK_BYTES_PER_THREAD ((size_t)1 << 20)
#endif

ptrdiff_t bn_chunk_channels(bn_shape s, int arrays, size_t itemsize)
{
    size_t per_channel = (size_t)(s.outer * s.inner) * itemsize * (size_t)arrays;
    size_t budget = BN_CHUNK_BYTES_PER_THREAD * (size_t)bn_get_num_threads();
    ptrdiff_t cc;
    if (budget < BN_CHUNK_BYTES) budget = BN_CHUNK_BYTES;
    cc = per_channel ? (ptrdiff_t)(budget / per_channel) : s.channels;
    if (!(s.inner > 1)) {
        /* Interleaved channels share cache lines and pages: a chunk reads a piece of every
         * row, and pieces much shorter than a page cost nearly whole rows of memory traffic
         * (the prefetchers fetch around them). So chunks are runs of at least 1 KB, and of
         * whole multiples of that, even when that overflows the chunk's byte budget. */
        ptrdiff_t run = (ptrdiff_t)(1024 / itemsize);
        cc = cc < run ? run : (cc + run - 1) / run * run;
    }
    return bn_max(1, bn_min(cc, s.channels));
}

double bn_part_count(const bn_tiling *t, bn_shape s, ptrdiff_t k)
{
    ptrdiff_t ob = k / t->n_ib, ib = k % t->n_ib;
    ptrdiff_t rows = bn_min(t->ob, s.outer - ob * t->ob);
    ptrdiff_t len = bn_min(t->ib, s.inner - ib * t->ib);
    return (double)(bn_max(rows, 0) * bn_max(len, 0));
}
