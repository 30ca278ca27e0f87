// Value checks that run on the GPU without the host waiting for them (fastface/_device_checks.py).
//
// A check looks for a value outside [lo, hi] among `count` elements values[offset + i * stride].
// NaN fails both comparisons, so [-FLT_MAX, FLT_MAX] finds NaN and infinities. A block that finds
// one writes the check's generation number into the check's slot of a record in pinned host memory,
// then into the record's first word. Under unified addressing (every 64-bit CUDA process) a kernel
// can write a pinned host address directly. The host reads the first word whenever a later
// fastface call is made, so no one waits for the GPU, and it learns which check failed from the
// slots. Plain stores, not atomics: system-scope atomics on host memory over PCIe are optional
// hardware, and a failed check only needs its generation to land somewhere.

#include <cuda_fp16.h>

// Values are compared as Bound: float for float16 (exact; NaN and infinities survive the widening).
template <typename T> __device__ __forceinline__ T widen(T v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

template <typename T, typename Bound>
__global__ void flag_values_outside(const T* __restrict__ values, long long count, long long offset,
                                    long long stride, Bound lo, Bound hi, unsigned long long record_address,
                                    int slot, unsigned long long generation)
{
    bool outside = false;
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
        const Bound x = widen(values[offset + i * stride]);
        outside |= !(x >= lo && x <= hi);
    }
    // Every thread reaches this barrier (the loop has no early exit): one store per failing block.
    if (__syncthreads_or(outside) && threadIdx.x == 0) {
        volatile unsigned long long* record = reinterpret_cast<volatile unsigned long long*>(record_address);
        record[1 + slot] = generation;
        // The slot must be visible to the host before the word that sends the host looking for it.
        __threadfence_system();
        record[0] = generation;
    }
}
