/* One pipeline step of the shared-memory all-reduce between two local ranks, in C.
 *
 * Same protocol and memory layout as the numpy path in _shm_engine.py (phase
 * counters of _shm_sync.py, slot halves of _shm_segment.py), minus the Python
 * between phases and one memory pass: the reduction writes its result to the
 * rank's slot and to its buffer at once.
 *
 * Stages (the return value is the stage to resume at, 0 when done):
 *   0: copy the peer's part of my buffer into my slot, signal 2k+1, then spin
 *      for the peer's 2k+1: not reached in `spin` polls -> return 1 (Python
 *      waits with timeouts and liveness checks, then resumes at 2); reached
 *      and `verify` -> return 2 (Python compares the call digests first).
 *   2: reduce my part (rank order: x0 op x1) into my buffer and my slot,
 *      signal 2k+2, spin for the peer's 2k+2: not reached -> return 3
 *      (Python waits, then resumes at 4).
 *   4: copy the peer's part of the result out of its slot; return 0.
 * A signal stores the counter with a full fence, then wakes the peer's futex
 * sleep if its "waiting on" word names us (the lost-wake-up protocol of
 * _shm_sync.py).
 */
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

static void signal_phase(volatile uint32_t *mine, volatile uint32_t *peer_waiting,
                         uint32_t me_plus1, uint32_t phase) {
    __atomic_store_n(mine, phase, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(peer_waiting, __ATOMIC_SEQ_CST) == me_plus1)
        syscall(SYS_futex, (uint32_t *)mine, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int spin_until(volatile uint32_t *w, uint32_t target, long spin) {
    for (long i = 0; i < spin; i++) {
        if (reached(__atomic_load_n(w, __ATOMIC_ACQUIRE), target)) return 1;
        cpu_relax();
    }
    return reached(__atomic_load_n(w, __ATOMIC_ACQUIRE), target);
}

#define OP_SUM(a, b) ((a) + (b))
#define OP_PROD(a, b) ((a) * (b))

/* x0 op x1 for every element of my part (rank 1's own input is x1); IEEE
 * arithmetic without fast-math, so the bits equal numpy's np.add/np.multiply. */
#define REDUCE(T, OP)                                                             \
    static void reduce_##T##_##OP(T *own, T *slot, const T *peer, long n, int r) { \
        if (r == 0)                                                               \
            for (long i = 0; i < n; i++) { T v = OP(own[i], peer[i]); slot[i] = v; own[i] = v; } \
        else                                                                      \
            for (long i = 0; i < n; i++) { T v = OP(peer[i], own[i]); slot[i] = v; own[i] = v; } \
    }

typedef float f32;
typedef double f64;
REDUCE(f32, OP_SUM) REDUCE(f32, OP_PROD)
REDUCE(f64, OP_SUM) REDUCE(f64, OP_PROD)

typedef void (*reduce_fn)(void *, void *, const void *, long, int);

/* [dtype: 0 float32, 1 float64][op: 0 sum, 1 prod] */
static const reduce_fn REDUCERS[2][2] = {
    {(reduce_fn)reduce_f32_OP_SUM, (reduce_fn)reduce_f32_OP_PROD},
    {(reduce_fn)reduce_f64_OP_SUM, (reduce_fn)reduce_f64_OP_PROD},
};

int distrib_ar2_step(int stage, int dtype, int op, char *own, char *slot_mine,
                     const char *slot_peer, long itemsize, long lo, long hi, long olo,
                     long ohi, int rank, volatile uint32_t *my_ctr,
                     volatile uint32_t *peer_ctr, volatile uint32_t *peer_waiting,
                     uint32_t k, long spin, int verify) {
    uint32_t me_plus1 = (uint32_t)rank + 1;
    if (dtype < 0 || dtype > 1 || op < 0 || op > 1) return -1;
    switch (stage) {
    case 0:
        memcpy(slot_mine + olo * itemsize, own + olo * itemsize, (size_t)(ohi - olo) * itemsize);
        signal_phase(my_ctr, peer_waiting, me_plus1, 2 * k + 1);
        if (!spin_until(peer_ctr, 2 * k + 1, spin)) return 1;
        if (verify) return 2;
        /* fall through */
    case 2:
        REDUCERS[dtype][op](own + lo * itemsize, slot_mine + lo * itemsize,
                            slot_peer + lo * itemsize, hi - lo, rank);
        signal_phase(my_ctr, peer_waiting, me_plus1, 2 * k + 2);
        if (!spin_until(peer_ctr, 2 * k + 2, spin)) return 3;
        /* fall through */
    case 4:
        memcpy(own + olo * itemsize, slot_peer + olo * itemsize, (size_t)(ohi - olo) * itemsize);
        return 0;
    default:
        return -1;
    }
}
