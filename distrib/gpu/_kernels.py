"""One fused CUDA kernel that reduces k device buffers and writes the result to m buffers.

Why fused: on one GPU shared by several processes, each process's kernels
time-slice the device rather than run together, so splitting a reduction
across ranks gave 16% of the device's copy rate on an H100 at 256 MiB; one
kernel in one process that reads every buffer once and writes every result
once is bound only by memory traffic (30% measured before, 50% the limit for
two ranks). The kernel moves 16-byte vectors when every pointer is 16-byte
aligned, with a scalar loop for the tail.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import DistUsageError
from .._reduce_op import ReduceOp

__all__ = ["copy_async", "fused_reduce"]

_THREADS = 256
_BLOCKS_PER_SM = 8  # persistent grid: enough warps in flight to saturate HBM

# numpy dtype (kind, itemsize) -> (element C type, accumulator C type)
_CTYPES: dict[tuple[str, int], tuple[str, str]] = {
    ("b", 1): ("unsigned char", "unsigned char"),
    ("i", 1): ("signed char", "int"),
    ("u", 1): ("unsigned char", "unsigned int"),
    ("i", 2): ("short", "int"),
    ("u", 2): ("unsigned short", "unsigned int"),
    ("i", 4): ("int", "int"),
    ("u", 4): ("unsigned int", "unsigned int"),
    ("i", 8): ("long long", "long long"),
    ("u", 8): ("unsigned long long", "unsigned long long"),
    ("f", 2): ("unsigned short", "float"),  # raw half bits, converted by PTX cvt
    ("f", 4): ("float", "float"),
    ("f", 8): ("double", "double"),
    ("c", 8): ("complex<float>", "complex<float>"),
    ("c", 16): ("complex<double>", "complex<double>"),
}

# AVG accumulates as SUM: the process group divides once at the end (the engine contract).
_OPS = {
    ReduceOp.SUM: "((a) + (b))",
    ReduceOp.AVG: "((a) + (b))",
    ReduceOp.PRODUCT: "((a) * (b))",
    # NaN propagates like numpy.minimum / numpy.maximum (x != x only for NaN).
    ReduceOp.MIN: "((((a) < (b)) || ((a) != (a))) ? (a) : (b))",
    ReduceOp.MAX: "((((a) > (b)) || ((a) != (a))) ? (a) : (b))",
    ReduceOp.BAND: "((a) & (b))",
    ReduceOp.BOR: "((a) | (b))",
    ReduceOp.BXOR: "((a) ^ (b))",
}
# numpy's ufuncs on bool: add = or, multiply = and, minimum = and, maximum = or.
_BOOL_OPS = {
    ReduceOp.SUM: "((a) | (b))",
    ReduceOp.AVG: "((a) | (b))",
    ReduceOp.PRODUCT: "((a) & (b))",
    ReduceOp.MIN: "((a) & (b))",
    ReduceOp.MAX: "((a) | (b))",
    ReduceOp.BAND: "((a) & (b))",
    ReduceOp.BOR: "((a) | (b))",
    ReduceOp.BXOR: "((a) ^ (b))",
}

_HALF = r"""
__device__ __forceinline__ float ld_(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short st_(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
"""
_PLAIN = r"""
__device__ __forceinline__ A ld_(T v) { return (A)v; }
__device__ __forceinline__ T st_(A v) { return (T)v; }
"""

_TEMPLATE = r"""
{include}
typedef {ctype} T;
typedef {atype} A;
{convert}
#define OP(a, b) {op}
extern "C" __global__ void distrib_fused(long long nvec, long long n, {params}) {{
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int V = 16 / sizeof(T);
    for (long long j = tid; j < nvec; j += stride) {{
{vec_loads}
        uint4 out;
        #pragma unroll
        for (int k = 0; k < V; ++k) {{
            A acc = ld_(reinterpret_cast<const T*>(&r0)[k]);
{vec_combine}
            reinterpret_cast<T*>(&out)[k] = st_(acc);
        }}
{vec_stores}
    }}
    for (long long i = nvec * V + tid; i < n; i += stride) {{
        A acc = ld_(s0[i]);
{scalar_combine}
        const T v = st_(acc);
{scalar_stores}
    }}
}}
"""

_kernels: dict[tuple[Any, ...], Any] = {}
_sm_count: dict[int, int] = {}


def _source(dtype: np.dtype, op: ReduceOp, nsrc: int, ndst: int) -> str:
    key = (dtype.kind, dtype.itemsize)
    ctype, atype = _CTYPES[key]
    op_expr = (_BOOL_OPS if dtype.kind == "b" else _OPS)[op]
    params = [f"const T* s{i}" for i in range(nsrc)] + [f"T* d{i}" for i in range(ndst)]
    return _TEMPLATE.format(
        include="#include <cupy/complex.cuh>" if dtype.kind == "c" else "",
        ctype=ctype,
        atype=atype,
        convert=_HALF if key == ("f", 2) else _PLAIN,
        op=op_expr,
        params=", ".join(params),
        vec_loads="\n".join(
            f"        const uint4 r{i} = reinterpret_cast<const uint4*>(s{i})[j];"
            for i in range(nsrc)
        ),
        vec_combine="\n".join(
            f"            acc = OP(acc, ld_(reinterpret_cast<const T*>(&r{i})[k]));"
            for i in range(1, nsrc)
        ),
        vec_stores="\n".join(
            f"        reinterpret_cast<uint4*>(d{i})[j] = out;" for i in range(ndst)
        ),
        scalar_combine="\n".join(f"        acc = OP(acc, ld_(s{i}[i]));" for i in range(1, nsrc)),
        scalar_stores="\n".join(f"        d{i}[i] = v;" for i in range(ndst)),
    )


def _kernel(cupy: Any, dtype: np.dtype, op: ReduceOp, nsrc: int, ndst: int) -> Any:
    key = (dtype.str, op, nsrc, ndst)
    kern = _kernels.get(key)
    if kern is None:
        if (dtype.kind, dtype.itemsize) not in _CTYPES:
            raise DistUsageError(
                f"GPU reduction does not support dtype {dtype}; supported: bool, int8..int64, "
                "uint8..uint64, float16, float32, float64, complex64, complex128",
                op="all_reduce",
            )
        kern = cupy.RawKernel(_source(dtype, op, nsrc, ndst), "distrib_fused")
        _kernels[key] = kern
    return kern


def fused_reduce(
    cupy: Any,
    srcs: list[int],
    dsts: list[int],
    count: int,
    dtype: np.dtype,
    op: ReduceOp,
    stream: Any,
) -> None:
    """Enqueue ``d[i] = op(s0[i], s1[i], ...)`` for every destination, on ``stream``.

    ``srcs`` and ``dsts`` are raw device pointers on the current device; a
    destination may alias a source (each element is read before it is written,
    by the same thread). ``ReduceOp.AVG`` sums: the process group divides.
    """
    if count == 0 or not dsts:
        return
    dtype = np.dtype(dtype)
    kern = _kernel(cupy, dtype, op, len(srcs), len(dsts))
    itemsize = dtype.itemsize
    aligned = all(p % 16 == 0 for p in (*srcs, *dsts))
    nvec = (count * itemsize) // 16 if aligned and 16 % itemsize == 0 else 0
    vec_elems = 16 // itemsize if nvec else 1
    work = max(nvec, count - nvec * vec_elems)
    device = cupy.cuda.Device()
    sms = _sm_count.get(device.id)
    if sms is None:
        sms = int(device.attributes["MultiProcessorCount"])
        _sm_count[device.id] = sms
    blocks = max(1, min((work + _THREADS - 1) // _THREADS, sms * _BLOCKS_PER_SM))
    args = [np.int64(nvec), np.int64(count)]
    args += [np.uint64(p) for p in (*srcs, *dsts)]
    kern((blocks,), (_THREADS,), tuple(args), stream=stream)


def copy_async(cupy: Any, dst: int, src: int, nbytes: int, stream: Any) -> None:
    """Enqueue a device-to-device copy of ``nbytes`` on ``stream``."""
    if nbytes:
        cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, 3, stream.ptr)  # 3: DeviceToDevice
