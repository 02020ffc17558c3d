/* The small all-reduce of the shared-memory engine in one compiled call.
 *
 * A CPython extension (built at install time; without a compiler the engine
 * keeps its Python path, _reduce._one_shot, which this mirrors step for step
 * on the same segment, so ranks on either path work together):
 *
 *   k = pipeline step, h = k & 1
 *   1. k >= 2: wait until every rank signalled 2k-1 (finished step k-2, the
 *      last user of half h);
 *   2. copy my buffer into half h of my slot, publish my call digest for h,
 *      signal 2k+1;
 *   3. wait for every rank's 2k+1; compare digests (verify);
 *   4. fold every rank's half h in rank order (x0 op x1 op ...) into my
 *      buffer, signal 2k+2.
 *
 * Every wait polls at most `spin` times, then calls sched_yield at most
 * `yields` times. A peer not there by then is returned to Python (`blocked`),
 * which waits with the deadline, liveness and abort checks and the futex
 * sleep of _sync.py, then resumes here at the stage it was given. Nothing here blocks for long, so the GIL is held.
 *
 * Header layout and signalling are _sync.py's: 128-byte line per rank after
 * one global line; words: counter 0, "waiting on" 1, digest 3 + 2h (low,
 * high); global word 0 is the abort word. A signal stores the counter with a
 * full fence, then wakes the counter's futex if some rank's "waiting on"
 * word names this rank.
 *
 * Arithmetic is IEEE without contraction (-ffp-contract=off) and integers
 * wrap as numpy's do, so results are bit-identical to the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define WORDS_PER_LINE 32
#define W_COUNTER 0
#define W_WAITING 1
#define W_DIGEST 3
#define MAX_RANKS 64

/* Return codes of OneShot.step (stages to resume at are positive). */
enum {
    NOT_HANDLED = -1,  /* unsupported dtype, op, layout or size: nothing was touched */
    DONE = 0,
    WAIT_FREE = 1,     /* blocked on a peer's 2k-1 (half h still being read) */
    WAIT_INPUTS = 2,   /* blocked on a peer's 2k+1 (its input not published yet) */
    DIFFER = 3,        /* some peer's digest differs: Python names the calls */
    ABORTED = 4,       /* the abort word is set: Python raises the abort */
    CLOSED = 5,
};

enum { OP_SUM = 0, OP_PROD = 1, OP_MIN = 2, OP_MAX = 3 };
enum { T_F32 = 0, T_F64 = 1, T_I32 = 2, T_I64 = 3 };

typedef struct {
    PyObject_HEAD
    PyObject *pipe;           /* the SlotPipeline: its `step` is read and advanced here */
    volatile uint32_t *words; /* the shared header */
    char *halves[2][MAX_RANKS];
    int n, rank;
    Py_ssize_t max_bytes;
    long spin, yields;
    int blocked;
} OneShot;

static inline int reached(uint32_t value, uint32_t target) {
    return (uint32_t)(value - target) < 0x80000000u;
}

static inline volatile uint32_t *word(OneShot *s, int q, int w) {
    return s->words + WORDS_PER_LINE * (1 + q) + w;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Every peer's counter reached target within the spin budget, then within
 * `yields` sched_yield calls (the core goes to whoever is runnable: with more
 * ranks than cores, often the very peer awaited); else blocked = it. */
static int all_reached(OneShot *s, uint32_t target) {
    for (int q = 0; q < s->n; q++) {
        if (q == s->rank) continue;
        volatile uint32_t *c = word(s, q, W_COUNTER);
        long i = 0, y = 0;
        while (!reached(__atomic_load_n(c, __ATOMIC_ACQUIRE), target)) {
            if (i < s->spin) {
                i++;
                relax();
            } else if (y++ < s->yields) {
                sched_yield();
            } else {
                s->blocked = q;
                return 0;
            }
        }
    }
    return 1;
}

static void signal_phase(OneShot *s, uint32_t phase) {
    volatile uint32_t *mine = word(s, s->rank, W_COUNTER);
    __atomic_store_n(mine, phase, __ATOMIC_SEQ_CST);
    for (int q = 0; q < s->n; q++) {
        if (q != s->rank &&
            __atomic_load_n(word(s, q, W_WAITING), __ATOMIC_SEQ_CST) == (uint32_t)s->rank + 1) {
            syscall(SYS_futex, (uint32_t *)mine, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
            return;
        }
    }
}

#define FOLD(NAME, T, EXPR)                                                        \
    static void NAME(char *out, char *const *src, int n, Py_ssize_t count) {       \
        T *o = (T *)out;                                                           \
        const T *a = (const T *)src[0];                                            \
        const T *b = (const T *)src[1];                                            \
        for (Py_ssize_t i = 0; i < count; i++) { T x = a[i], y = b[i]; o[i] = (EXPR); } \
        for (int q = 2; q < n; q++) {                                              \
            const T *c = (const T *)src[q];                                        \
            for (Py_ssize_t i = 0; i < count; i++) { T x = o[i], y = c[i]; o[i] = (EXPR); } \
        }                                                                          \
    }

/* Integers in unsigned arithmetic: wraps like numpy, no undefined overflow. */
FOLD(sum_f32, float, x + y)
FOLD(prod_f32, float, x * y)
FOLD(sum_f64, double, x + y)
FOLD(prod_f64, double, x * y)
FOLD(sum_i32, uint32_t, x + y)
FOLD(prod_i32, uint32_t, x * y)
FOLD(min_i32, int32_t, x < y ? x : y)
FOLD(max_i32, int32_t, x > y ? x : y)
FOLD(sum_i64, uint64_t, x + y)
FOLD(prod_i64, uint64_t, x * y)
FOLD(min_i64, int64_t, x < y ? x : y)
FOLD(max_i64, int64_t, x > y ? x : y)

typedef void (*fold_fn)(char *, char *const *, int, Py_ssize_t);

/* [type][op]; NULL: not handled here (float min/max: NaN and signed-zero rules). */
static const fold_fn FOLDS[4][4] = {
    {sum_f32, prod_f32, NULL, NULL},
    {sum_f64, prod_f64, NULL, NULL},
    {sum_i32, prod_i32, min_i32, max_i32},
    {sum_i64, prod_i64, min_i64, max_i64},
};

static int type_of(const char *format, Py_ssize_t itemsize) {
    if (format == NULL || format[0] == '\0' || format[1] != '\0') return -1;
    switch (format[0]) {
    case 'f': return itemsize == 4 ? T_F32 : -1;
    case 'd': return itemsize == 8 ? T_F64 : -1;
    case 'i': case 'l': case 'q':
        return itemsize == 4 ? T_I32 : itemsize == 8 ? T_I64 : -1;
    default: return -1;
    }
}

static PyObject *STEP; /* interned "step" */

/* step(stage, array, op, digest, verify) -> code (see the enum above). The
 * pipeline step k is the pipeline's `step`, advanced to k + 1 when DONE. */
static PyObject *OneShot_step(OneShot *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "step(stage, array, op, digest, verify)");
        return NULL;
    }
    long stage = PyLong_AsLong(args[0]);
    long op = PyLong_AsLong(args[2]);
    unsigned long long digest = PyLong_AsUnsignedLongLongMask(args[3]);
    int verify = PyObject_IsTrue(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (s->words == NULL) return PyLong_FromLong(CLOSED);
    PyObject *step = PyObject_GetAttr(s->pipe, STEP);
    if (step == NULL) return NULL;
    long long k = PyLong_AsLongLong(step);
    Py_DECREF(step);
    if (k < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "step: negative pipeline step");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear(); /* read-only, strided or not a buffer: the general path decides */
        return PyLong_FromLong(NOT_HANDLED);
    }
    int t = type_of(view.format, view.itemsize);
    fold_fn fold = (t < 0 || op < 0 || op > 3) ? NULL : FOLDS[t][op];
    Py_ssize_t nbytes = view.len;
    char *own = (char *)view.buf;
    PyBuffer_Release(&view); /* the caller holds the array for the whole call */
    if (fold == NULL || nbytes == 0 || nbytes > s->max_bytes) return PyLong_FromLong(NOT_HANDLED);

    int h = (int)(k & 1);
    uint32_t k32 = (uint32_t)k;
    if (__atomic_load_n(s->words, __ATOMIC_ACQUIRE)) return PyLong_FromLong(ABORTED);
    switch (stage) {
    case 0:
    case WAIT_FREE:
        if (k >= 2 && !all_reached(s, 2 * k32 - 1)) return PyLong_FromLong(WAIT_FREE);
        memcpy(s->halves[h][s->rank], own, (size_t)nbytes);
        if (verify) {
            *word(s, s->rank, W_DIGEST + 2 * h) = (uint32_t)digest;
            *word(s, s->rank, W_DIGEST + 2 * h + 1) = (uint32_t)(digest >> 32);
        }
        signal_phase(s, 2 * k32 + 1);
        /* fall through */
    case WAIT_INPUTS:
        if (!all_reached(s, 2 * k32 + 1)) return PyLong_FromLong(WAIT_INPUTS);
        if (verify) {
            for (int q = 0; q < s->n; q++) {
                uint64_t theirs = (uint64_t)*word(s, q, W_DIGEST + 2 * h) |
                                  ((uint64_t)*word(s, q, W_DIGEST + 2 * h + 1) << 32);
                if (theirs != digest) return PyLong_FromLong(DIFFER);
            }
        }
        fold(own, s->halves[h], s->n, nbytes / (t == T_F32 || t == T_I32 ? 4 : 8));
        signal_phase(s, 2 * k32 + 2);
        {
            PyObject *next = PyLong_FromLongLong(k + 1);
            if (next == NULL) return NULL;
            int failed = PyObject_SetAttr(s->pipe, STEP, next);
            Py_DECREF(next);
            if (failed) return NULL;
        }
        return PyLong_FromLong(DONE);
    default:
        PyErr_Format(PyExc_ValueError, "step: no stage %ld", stage);
        return NULL;
    }
}

static void OneShot_dealloc(OneShot *s) {
    Py_XDECREF(s->pipe);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *OneShot_close(OneShot *s, PyObject *unused) {
    (void)unused;
    s->words = NULL; /* the segment is about to be unmapped: refuse every later step */
    Py_RETURN_NONE;
}

static PyObject *OneShot_blocked(OneShot *s, void *unused) {
    (void)unused;
    return PyLong_FromLong(s->blocked);
}

/* OneShot(pipe, header_addr, halves0, halves1, rank, max_bytes, spin, yields):
 * halvesH[q] is the address of half H of local rank q's slot. */
static int OneShot_init(OneShot *s, PyObject *args, PyObject *kwds) {
    PyObject *pipe;
    unsigned long long header;
    PyObject *h0, *h1;
    int rank;
    Py_ssize_t max_bytes;
    long spin, yields;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "OKO!O!inll", &pipe, &header, &PyTuple_Type, &h0, &PyTuple_Type,
                          &h1, &rank, &max_bytes, &spin, &yields))
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(h0);
    if (n < 2 || n > MAX_RANKS || PyTuple_GET_SIZE(h1) != n || rank < 0 || rank >= n ||
        max_bytes < 0 || spin < 0 || yields < 0) {
        PyErr_SetString(PyExc_ValueError, "OneShot: bad geometry");
        return -1;
    }
    for (Py_ssize_t q = 0; q < n; q++) {
        s->halves[0][q] = (char *)(uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(h0, q));
        s->halves[1][q] = (char *)(uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(h1, q));
    }
    if (PyErr_Occurred()) return -1;
    Py_INCREF(pipe);
    Py_XSETREF(s->pipe, pipe);
    s->words = (volatile uint32_t *)(uintptr_t)header;
    s->n = (int)n;
    s->rank = rank;
    s->max_bytes = max_bytes;
    s->spin = spin;
    s->yields = yields;
    s->blocked = -1;
    return 0;
}

static PyMethodDef OneShot_methods[] = {
    {"step", (PyCFunction)(void (*)(void))OneShot_step, METH_FASTCALL,
     "step(stage, array, op, k, digest, verify) -> code"},
    {"close", (PyCFunction)OneShot_close, METH_NOARGS, "refuse every later step"},
    {NULL},
};

static PyGetSetDef OneShot_getset[] = {
    {"blocked", (getter)OneShot_blocked, NULL, "the local rank the last step stopped for", NULL},
    {NULL},
};

static PyTypeObject OneShotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "distrib.transport.shm._oneshot.OneShot",
    .tp_basicsize = sizeof(OneShot),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The small shared-memory all-reduce of one local rank, bound to its segment.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)OneShot_dealloc,
    .tp_init = (initproc)OneShot_init,
    .tp_methods = OneShot_methods,
    .tp_getset = OneShot_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_oneshot", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__oneshot(void) {
    STEP = PyUnicode_InternFromString("step");
    if (STEP == NULL || PyType_Ready(&OneShotType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&OneShotType);
    if (PyModule_AddObject(m, "OneShot", (PyObject *)&OneShotType) < 0) {
        Py_DECREF(&OneShotType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "NOT_HANDLED", NOT_HANDLED);
    PyModule_AddIntConstant(m, "DONE", DONE);
    PyModule_AddIntConstant(m, "WAIT_FREE", WAIT_FREE);
    PyModule_AddIntConstant(m, "WAIT_INPUTS", WAIT_INPUTS);
    PyModule_AddIntConstant(m, "DIFFER", DIFFER);
    PyModule_AddIntConstant(m, "ABORTED", ABORTED);
    PyModule_AddIntConstant(m, "CLOSED", CLOSED);
    return m;
}
