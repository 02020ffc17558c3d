/* One pipeline step of the shared-memory all-reduce among the local ranks, in C.
 *
 * Same protocol and memory layout as the numpy staged path in _reduce.py
 * (phase counters of _sync.py, slot halves of _segment.py, part q of
 * a chunk = elements [q*count/n, (q+1)*count/n)), minus the Python between
 * phases and one memory pass: the reduction writes its result to the rank's
 * slot and to its buffer at once.
 *
 * Stages (the return value is the stage to resume at, 0 when done):
 *   0: copy the parts the others reduce into my slot, signal 2k+1;
 *   1: spin for every peer's 2k+1: one not there within `spin` polls ->
 *      *blocked = it, return 1 (Python waits with timeouts and liveness
 *      checks, then resumes at 1); all there and `verify` -> return 2
 *      (Python compares the call digests, then resumes at 2);
 *   2: reduce my part in rank order (x0 op x1 op ...) into my buffer and my
 *      slot, signal 2k+2;
 *   3: spin for every peer's 2k+2 (-> return 3 as above), then copy every
 *      other part of the result out of its owner's slot; return 0.
 * A signal stores the counter with a full fence, then wakes the futex of my
 * counter if some rank's "waiting on" word names me (the lost-wake-up
 * protocol of _sync.py).
 *
 * Everything written into my slot (stage 0's inputs, stage 2's result) is
 * written with ordinary or streaming (non-temporal) stores as `stream` says
 * (_stores.py chooses by measurement): the slot's lines were read by the
 * peers a step earlier, and where the cores that read and write them do not
 * share a cache, ordinary stores must first take every line back from the
 * peer (read-for-ownership), which was measured to make the copy into the
 * slot about 5x slower; streaming stores write whole lines to memory without
 * taking them.
 */
#include <emmintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }

static inline int reached(uint32_t value, uint32_t target) {
    return (uint32_t)(value - target) < 0x80000000u;
}

static int spin_until(volatile uint32_t *w, uint32_t target, long spin) {
    for (long i = 0; i < spin; i++) {
        if (reached(__atomic_load_n(w, __ATOMIC_ACQUIRE), target)) return 1;
        cpu_relax();
    }
    return reached(__atomic_load_n(w, __ATOMIC_ACQUIRE), target);
}

/* memcpy with streaming stores (SSE2, present on every x86-64): 16-byte
 * aligned stores to the destination, unaligned loads, then a store fence, so
 * the data is in memory before the caller signals that it is there. */
void distrib_stream_copy(char *dst, const char *src, size_t n) {
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
    _mm_sfence();
}

#define OP_SUM(a, b) ((a) + (b))
#define OP_PROD(a, b) ((a) * (b))
#define BLOCK 1024

/* Fold part [lo, hi) of every rank's input in rank order through a block in
 * L1, then write it to my slot and my buffer. src[q] is rank q's input (my own
 * buffer for q == rank). IEEE arithmetic without fast-math: numpy's bits. */
#define REDUCE(T, OP)                                                              \
    static void reduce_##T##_##OP(char *const *src, int n, char *slot, char *own,    \
                                  long lo, long hi) {                               \
        T acc[BLOCK];                                                              \
        if (n == 2) { /* one fused loop: the fastest form measured at 2 ranks */    \
            const T *a = (const T *)src[0], *b = (const T *)src[1];                \
            T *s = (T *)slot, *o = (T *)own;                                       \
            for (long i = lo; i < hi; i++) { T v = OP(a[i], b[i]); s[i] = v; o[i] = v; } \
            return;                                                                \
        }                                                                          \
        for (long i0 = lo; i0 < hi; i0 += BLOCK) {                                 \
            long m = hi - i0 < BLOCK ? hi - i0 : BLOCK;                            \
            const T *a = (const T *)src[0] + i0, *b = (const T *)src[1] + i0;      \
            for (long i = 0; i < m; i++) acc[i] = OP(a[i], b[i]);                 \
            for (int q = 2; q < n; q++) {                                          \
                const T *c = (const T *)src[q] + i0;                               \
                for (long i = 0; i < m; i++) acc[i] = OP(acc[i], c[i]);           \
            }                                                                      \
            memcpy((T *)slot + i0, acc, (size_t)m * sizeof(T));                    \
            memcpy((T *)own + i0, acc, (size_t)m * sizeof(T));                     \
        }                                                                          \
    }

typedef float f32;
typedef double f64;
REDUCE(f32, OP_SUM) REDUCE(f32, OP_PROD)
REDUCE(f64, OP_SUM) REDUCE(f64, OP_PROD)

typedef void (*reduce_fn)(char *const *, int, char *, char *, long, long);

/* [dtype: 0 float32, 1 float64][op: 0 sum, 1 prod] */
static const reduce_fn REDUCERS[2][2] = {
    {reduce_f32_OP_SUM, reduce_f32_OP_PROD},
    {reduce_f64_OP_SUM, reduce_f64_OP_PROD},
};

static inline long bound(long count, int n, int q) { return (long)q * count / n; }

static void signal_all(volatile uint32_t *mine, uint32_t *const *waiting, int n, int rank,
                       uint32_t phase) {
    __atomic_store_n(mine, phase, __ATOMIC_SEQ_CST);
    for (int q = 0; q < n; q++) {
        if (q != rank && __atomic_load_n(waiting[q], __ATOMIC_SEQ_CST) == (uint32_t)rank + 1) {
            syscall(SYS_futex, (uint32_t *)mine, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
            return;
        }
    }
}

static int spin_all(uint32_t *const *ctrs, int n, int rank, uint32_t target, long spin,
                    int *blocked) {
    for (int q = 0; q < n; q++) {
        if (q != rank && !spin_until(ctrs[q], target, spin)) {
            *blocked = q;
            return 0;
        }
    }
    return 1;
}

/* own: this rank's chunk; slots[q]: rank q's slot half for this step; count:
 * elements in the chunk; ctrs[q], waiting[q]: rank q's counter and "waiting on"
 * words. */
int distrib_shm_step(int stage, int dtype, int op, char *own, char *const *slots, long count,
                     long itemsize, int n, int rank, uint32_t *const *ctrs,
                     uint32_t *const *waiting, uint32_t k, long spin, int verify,
                     int stream, int *blocked) {
    char *src[64];
    if (dtype < 0 || dtype > 1 || op < 0 || op > 1 || n < 2 || n > 64) return -1;
    switch (stage) {
    case 0:
        for (int q = 0; q < n; q++) {
            long lo = bound(count, n, q), hi = bound(count, n, q + 1);
            if (q != rank && hi > lo) {
                char *dst = slots[rank] + lo * itemsize;
                const char *src = own + lo * itemsize;
                size_t len = (size_t)(hi - lo) * itemsize;
                if (stream)
                    distrib_stream_copy(dst, src, len);
                else
                    memcpy(dst, src, len);
            }
        }
        signal_all(ctrs[rank], waiting, n, rank, 2 * k + 1);
        /* fall through */
    case 1:
        if (!spin_all(ctrs, n, rank, 2 * k + 1, spin, blocked)) return 1;
        if (verify) return 2;
        /* fall through */
    case 2:
        for (int q = 0; q < n; q++) src[q] = q == rank ? own : slots[q];
        if (!stream) {
            REDUCERS[dtype][op](src, n, slots[rank], own, bound(count, n, rank),
                                bound(count, n, rank + 1));
        } else {
            /* the result into my buffer, then a block at a time (still in L1)
             * into my slot with streaming stores */
            long hi = bound(count, n, rank + 1);
            for (long lo = bound(count, n, rank); lo < hi; lo += BLOCK) {
                long end = hi - lo < BLOCK ? hi : lo + BLOCK;
                REDUCERS[dtype][op](src, n, own, own, lo, end);
                distrib_stream_copy(slots[rank] + lo * itemsize, own + lo * itemsize,
                                    (size_t)(end - lo) * itemsize);
            }
        }
        signal_all(ctrs[rank], waiting, n, rank, 2 * k + 2);
        /* fall through */
    case 3:
        if (!spin_all(ctrs, n, rank, 2 * k + 2, spin, blocked)) return 3;
        for (int q = 0; q < n; q++) {
            long lo = bound(count, n, q), hi = bound(count, n, q + 1);
            if (q != rank && hi > lo)
                memcpy(own + lo * itemsize, slots[q] + lo * itemsize, (size_t)(hi - lo) * itemsize);
        }
        return 0;
    default:
        return -1;
    }
}
