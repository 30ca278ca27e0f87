"""The kernels of kernels/*.cu compiled for the host, for tests/fake_cupy.py's compute mode.

A kernel whose threads never wait for or talk to each other (no barrier, no shuffle or vote, no shared
memory) gives the same result whatever order its threads run in, up to the order of its atomics. Such a
kernel runs here as a plain loop over (block, thread), each iteration calling the kernel's own code with
blockIdx/threadIdx set ("sequential" mode). A kernel whose threads do cooperate runs with each block's
threads together ("threads" mode, below). `emulation(filename, expression)` says how a declared kernel
runs, and `launch(...)` runs it on the memory of fake cupy arrays (real host addresses).

How the host build works: the source as `fastface._backend.read_kernel_source` gives it (the kernels/
headers pasted in, as NVRTC sees it) is written to a temporary file and included by a generated C++ shim
that defines the CUDA built-ins the files use (`_PRELUDE`: __global__ & co. as nothing, float2/float4,
bit casts, min/max, atomics as plain read-modify-writes, __half as GCC's _Float16, __shared__ as static
storage, `extern __shared__` arrays as a 48 KiB static buffer) and exports, for every declared kernel of
the file that can be emulated, `extern "C" int launch_<name>(gx, gy, gz, bx, by, bz, void** args)`, which
unpacks args[i] by the parameter's C type (the signature tests/fake_cupy.py parses), runs the grid and
returns nonzero on a failure that `emulation_error()` describes (`launch` raises LaunchError with it).
One shared library per (source text, declared kernels, flags), built once per process. A file compiled
with --fmad=false is built with -ffp-contract=off, so its float32 arithmetic rounds like the Numba twin's.

"threads" mode: each CUDA thread of a block is a fiber (a ucontext with its own stack) on the calling host
thread. Blocks run one after another, so a block's `__shared__` memory is static storage (not cleared
between blocks, as on a GPU; the dynamic buffer is refilled with 0xFF garbage per block). A fiber runs
until it returns or waits in:
- __syncthreads / _or / _and / _count: a block barrier; a thread that has returned from the kernel drops
  out of it (as on current GPUs);
- __shfl_sync / _down / _up / _xor, __ballot_sync, __any_sync, __all_sync, __syncwarp: an exchange between
  the live lanes of its warp (every live lane must take part, whatever the mask: the kernels pass full
  masks). Reading a lane that has returned, does not exist (a partial warp) or is not in the mask fails
  the launch: on a GPU the value would be undefined.
The scheduler runs a block's fibers in thread order (even blocks) or reverse order (odd blocks), round
after round, so the result is deterministic, and a missing barrier shows in one order or the other. When
no fiber can run while some wait, the launch fails at once naming the intrinsics they wait in (a
deadlock); a thread that never returns or waits (an endless loop) hangs, as on a GPU. Atomics need no lock:
only one fiber runs at a time, and only switches at the intrinsics above.

Which kernels run how is decided per kernel, from the text of its definition and of everything it names
that the file defines (device functions, structs, constants, macros), transitively: any of
`_NEEDS_THREADS_TOGETHER` there makes the kernel run in "threads" mode if all of them are in
`_MODELLED_COOPERATION`, and check-only otherwise (inline PTX `asm`, cooperative groups, __activemask,
match/reduce intrinsics). One barrier is also modelled one thread after another, for speed: a block-wide
`__syncthreads_or(x)` whose result only thread 0 acts on (`if (__syncthreads_or(x) && threadIdx.x == 0)`,
kernels/checks.cu's value checks). Such a kernel runs each block's threads in reverse order, thread 0
last, with `__syncthreads_or` returning the OR over the threads run so far: thread 0 then sees the OR of
the whole block, which is all the kernel uses ("barrier_or_thread_0" mode). It is allowed only on 1-D
blocks, and only when the kernel's text has that exact form (`_BARRIER_OR_FOR_THREAD_0`).

What this checks and what it does not: the kernels' arithmetic, indexing, argument unpacking and their
cooperation through barriers, shuffles and shared memory, and the Python side around them (allocation,
aliasing, template choice, accumulators), against the CPU path. Not the GPU's scheduling (the fibers
interleave only at the intrinsics above: races between other accesses do not show), its memory model,
contraction of a*b+c where --fmad=false is not given, or its libm (sincosf, sqrtf, division round
differently on a GPU: compare with the GPU-vs-CPU tolerances).
"""
import ctypes
import functools
import hashlib
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy as np

from fastface._backend import KernelFile, read_kernel_source
from tests import fake_cupy

__all__ = ["Emulation", "emulation", "launch", "library", "declared_expressions", "entry_point", "host_flags",
           "NotEmulatable"]

# Anything here, in a kernel or in what it calls, needs the threads of a block or warp to run together.
_NEEDS_THREADS_TOGETHER = re.compile(
    r"__syncthreads\w*|__syncwarp|__shfl\w*|__shared__|__ballot\w*|__any_sync|__all_sync|__uni_sync|__activemask"
    r"|__match_\w+|__reduce_\w+_sync|cooperative_groups|this_thread_block|\basm\b|__threadfence_block")

# What the prelude models when a block's threads run together ("threads" mode); anything else of
# _NEEDS_THREADS_TOGETHER (inline PTX, cooperative groups, match/reduce intrinsics, __activemask) is check-only.
_MODELLED_COOPERATION = frozenset({
    "__syncthreads", "__syncthreads_or", "__syncthreads_and", "__syncthreads_count", "__shared__",
    "__shfl_sync", "__shfl_down_sync", "__shfl_up_sync", "__shfl_xor_sync",
    "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp", "__threadfence_block"})

# The one barrier modelled one thread after another (see the module docstring): the kernel body must contain
# exactly this.
_BARRIER_OR_FOR_THREAD_0 = re.compile(r"if\s*\(\s*__syncthreads_or\s*\(\s*\w+\s*\)\s*&&\s*threadIdx\.x\s*==\s*0\s*\)")


class NotEmulatable(AssertionError):
    """A launch that compute mode was asked to run but cannot."""


class Emulation:
    """Whether and how one kernel runs on the host.

    mode: "sequential" (blocks and threads in order), "barrier_or_thread_0" (each block's threads in
    reverse order), "threads" (each block's threads together as fibers; see the module docstring), or None
    (check-only); reason: why, in words.
    """

    def __init__(self, mode, reason):
        self.mode, self.reason = mode, reason

    @property
    def runs(self):
        return self.mode is not None

    def __repr__(self):
        return f"Emulation({self.mode!r}, {self.reason!r})"


# ---------------------------------------------------------------------------------------------
# What a kernel uses: its definition and, transitively, the file's definitions it names.

def _source_without_comments(filename):
    return fake_cupy._COMMENT.sub(" ", read_kernel_source(filename)).replace("\\\n", " ")


_MACRO = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(.*)$", re.M)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_SKIPPED_CALLS = {"__launch_bounds__", "alignas", "__align__", "sizeof", "decltype", "static_assert"}


def _top_level_items(text):
    """The file's top-level declarations and definitions as text, each ending at a `;` or a `}` at
    depth 0 (a `}` followed by `;`, as after a struct or an initialiser, takes the `;` too)."""
    items, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                rest = text[i + 1:]
                stripped = rest.lstrip()
                if stripped.startswith(";"):
                    i += 1 + (len(rest) - len(stripped))
                items.append(text[start:i + 1])
                start = i + 1
        elif ch == ";" and depth == 0:
            items.append(text[start:i + 1])
            start = i + 1
        i += 1
    return [item for item in items if item.strip()]


def _without_template_headers(text):
    """text without its `template <...>` clauses (whose `class T` would read as a struct)."""
    out, i = [], 0
    for m in re.finditer(r"\btemplate\s*<", text):
        if m.start() < i:
            continue
        depth, j = 0, m.end() - 1
        for j in range(m.end() - 1, len(text)):
            depth += text[j] == "<"
            depth -= text[j] == ">"
            if depth == 0:
                break
        out.append(text[i:m.start()])
        i = j + 1
    out.append(text[i:])
    return " ".join(out)


def _defined_name(item):
    """The name a top-level item defines (a struct, function, or variable), or None."""
    head = _without_template_headers(item.split("{", 1)[0])
    m = re.search(r"\b(?:struct|class|union)\s+(?:(?:alignas|__align__)\s*\((?:[^()]|\([^()]*\))*\)\s*)?"
                  r"([A-Za-z_]\w*)", head)
    if m:
        return m.group(1)
    if re.search(r"\boperator\b", head):
        return "operator"
    # A function: the identifier before the first call-like parenthesis that is not an attribute.
    for m in re.finditer(r"([A-Za-z_]\w*)\s*(<[^()]*>)?\s*\(", head):
        if m.group(1) not in _SKIPPED_CALLS:
            equals = head.find("=")
            if equals == -1 or m.start() < equals:
                return m.group(1)
            break
    # A variable: the identifier before `[`, `=` or `;`.
    m = re.search(r"([A-Za-z_]\w*)\s*(?:\[[^\]]*\]\s*)*(?:=|;)", head)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=None)
def _definitions(filename):
    """(name -> [texts defining it], macro name -> body) for kernels/<filename>."""
    text = _source_without_comments(filename)
    macros = {m.group(1): m.group(2) for m in _MACRO.finditer(text)}
    code = "\n".join("" if line.lstrip().startswith("#") else line for line in text.split("\n"))
    definitions = {}
    for item in _top_level_items(code):
        # An item whose name is not recognised goes with the operators: into every kernel's text.
        definitions.setdefault(_defined_name(item) or "operator", []).append(item)
    return definitions, macros


def _used_text(filename, kernel_name):
    """The texts of the kernel's definition and of every definition and macro of the file it names,
    transitively (operator overloads, and items whose name is not recognised, always: a use of an
    operator names no identifier)."""
    definitions, macros = _definitions(filename)
    kernel_items = [item for item in definitions.get(kernel_name, []) if "{" in item]
    if len(kernel_items) != 1:
        raise NotEmulatable(f"kernels/{filename}: {len(kernel_items)} definitions of {kernel_name!r}")
    texts, seen = [], {kernel_name}
    pending = kernel_items + definitions.get("operator", [])
    while pending:
        text = pending.pop()
        texts.append(text)
        for identifier in set(_IDENTIFIER.findall(text)):
            if identifier in seen:
                continue
            seen.add(identifier)
            pending.extend(definitions.get(identifier, []))
            if identifier in macros:
                pending.append(macros[identifier])
    return kernel_items[0], texts


@functools.lru_cache(maxsize=None)
def emulation(filename, expression):
    """How the declared kernel `expression` of kernels/<filename> runs on the host (an Emulation)."""
    name = expression.split("<")[0].strip()
    kernel_text, texts = _used_text(filename, name)
    found = sorted({m.group(0) for text in texts for m in _NEEDS_THREADS_TOGETHER.finditer(text)})
    if not found:
        return Emulation("sequential", "no barrier, shuffle, vote or shared memory: threads run one after another")
    if found == ["__syncthreads_or"] and len(_BARRIER_OR_FOR_THREAD_0.findall(kernel_text)) == 1 \
            and sum(text.count("__syncthreads_or") for text in texts) == 1:
        return Emulation("barrier_or_thread_0", "one __syncthreads_or read by thread 0 only: each block's threads "
                                                "run in reverse order, thread 0 last")
    unsupported = [f for f in found if f not in _MODELLED_COOPERATION]
    if not unsupported:
        return Emulation("threads", f"uses {', '.join(found)}: each block's threads run together as host threads")
    return Emulation(None, f"uses {', '.join(found)}; {', '.join(unsupported)} cannot run on the host")


def declared_expressions(filename):
    """Every kernel name expression some KernelFile declares for kernels/<filename>, in declaration order."""
    seen = {}
    for kernel_file in KernelFile.declared:
        if kernel_file.filename == filename:
            for expression in kernel_file.kernels:
                seen.setdefault(expression, None)
    return tuple(seen)


# ---------------------------------------------------------------------------------------------
# The host build

_PRELUDE = r"""
// CUDA built-ins for a host build of kernels/*.cu (tests/emulated_kernels.py). A grid's threads run one after
// another ("sequential", "barrier_or_thread_0"), or each block's threads together as fibers on this host
// thread ("threads": one ucontext stack per CUDA thread, switched at barriers, shuffles and votes).
#include <ucontext.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __constant__ static
// Blocks run one at a time, so a block's shared memory can be static storage (not cleared between
// blocks: CUDA does not clear it either).
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
using std::isfinite;
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct dim3 { unsigned int x, y, z; };
static dim3 blockIdx, blockDim, threadIdx, gridDim;
// The running fiber's linear thread index in its block in "threads" mode; -1 when threads run one after another.
static int emulated_thread = -1;
// Dynamic (extern __shared__) memory: as much as a block gets without opting in, 0xFF garbage per block.
alignas(16) static unsigned char emulated_dynamic_shared[48 * 1024];
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
[[noreturn]] static void emulation_unreachable(const char* what) {
    std::fprintf(stderr, "tests/emulated_kernels.py: %s reached in a kernel run one thread after another\n", what);
    std::abort();
}
// Atomics: plain read-modify-writes, which is what they are when one host thread runs every CUDA thread and
// switches only at barriers, shuffles and votes.
static inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }
static inline int atomicAdd(int* p, int v) { const int o = *p; *p = o + v; return o; }
static inline int atomicSub(int* p, int v) { const int o = *p; *p = o - v; return o; }
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    const unsigned long long o = *p; if (v < o) *p = v; return o;
}
template <typename T> static inline T __ldg(const T* p) { return *p; }
// CUDA's integer and float min/max overloads.
#define EMULATED_MIN_MAX(T) \
    static inline T min(T a, T b) { return b < a ? b : a; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
EMULATED_MIN_MAX(int)
EMULATED_MIN_MAX(unsigned int)
EMULATED_MIN_MAX(long long)
EMULATED_MIN_MAX(unsigned long long)
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline void __threadfence() {}
static inline void __threadfence_block() {}
static inline void __threadfence_system() {}

// ---- "threads" mode: the fibers of one block and what they wait at.
enum EmulatedState { kRunnable, kAtBarrier, kAtWarp, kDone };
struct EmulatedFiber {
    ucontext_t context;
    dim3 index;
    EmulatedState state;
    const char* waits_at;  // the intrinsic it waits in
};
static ucontext_t emulated_scheduler;
static std::vector<EmulatedFiber> emulated_fibers;
static char* emulated_stacks;  // uninitialised (malloc): only the pages a fiber touches get committed
static size_t emulated_stacks_size;
static const size_t kEmulatedStack = 128 * 1024;
static void (*emulated_body)(void*);
static void* emulated_body_argument;
// Thrown out of a kernel body to end its fiber; the launch then returns nonzero and emulated_error says why.
struct EmulatedFailure {};
static std::string emulated_error;
static bool emulated_failed;
[[noreturn]] static void emulated_fail(const std::string& what) {
    char where[160];
    std::snprintf(where, sizeof where, " (at block (%u, %u, %u), thread (%u, %u, %u))", blockIdx.x, blockIdx.y,
                  blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    if (!emulated_failed) emulated_error = what + where;
    emulated_failed = true;
    throw EmulatedFailure{};
}
// Back to the scheduler until released; a failure elsewhere in the block ends this fiber too.
static void emulated_wait(EmulatedState state, const char* what) {
    EmulatedFiber& self = emulated_fibers[emulated_thread];
    self.state = state;
    self.waits_at = what;
    swapcontext(&self.context, &emulated_scheduler);
    if (emulated_failed) throw EmulatedFailure{};
}

// The block barrier (__syncthreads*): a thread that has returned from the kernel no longer takes part, as on
// current GPUs. Each phase hands every thread that took part the count of true predicates and of arrivals.
struct EmulatedBlockBarrier {
    unsigned live = 0, arrived = 0, count = 0, result_arrived = 0, result_count = 0;
    void complete() {
        result_count = count;
        result_arrived = arrived;
        arrived = count = 0;
        for (auto& f : emulated_fibers)
            if (f.state == kAtBarrier) f.state = kRunnable;
    }
    void arrive(int predicate, const char* what) {
        count += predicate != 0;
        if (++arrived == live) complete();
        else emulated_wait(kAtBarrier, what);
    }
    void drop() {
        --live;
        if (arrived > 0 && arrived == live) complete();
    }
};
// A warp's exchange (shuffles, votes, __syncwarp): each live lane of the warp puts in its value, whatever its
// mask (the kernels pass full masks), and every lane then reads the snapshot. Returned lanes drop out.
struct EmulatedWarp {
    unsigned live = 0, arrived = 0, present = 0;
    unsigned long long slot[32], snapshot[32];
    void complete(unsigned warp) {
        std::memcpy(snapshot, slot, sizeof slot);
        present = arrived;
        arrived = 0;
        for (unsigned lane = 0; lane < 32 && warp * 32 + lane < emulated_fibers.size(); ++lane)
            if (emulated_fibers[warp * 32 + lane].state == kAtWarp) emulated_fibers[warp * 32 + lane].state = kRunnable;
    }
    void exchange(unsigned warp, unsigned lane, unsigned long long bits, const char* what) {
        slot[lane] = bits;
        arrived |= 1u << lane;
        if (arrived == live) complete(warp);
        else emulated_wait(kAtWarp, what);
    }
    void drop(unsigned warp, unsigned lane) {
        live &= ~(1u << lane);
        if (arrived != 0 && arrived == live) complete(warp);
    }
};
static EmulatedBlockBarrier emulated_barrier;
static EmulatedWarp emulated_warps[32];

static inline void emulated_syncthreads(int predicate, const char* what) {
    if (emulated_thread < 0) emulation_unreachable(what);
    emulated_barrier.arrive(predicate, what);
}
static inline void __syncthreads() { emulated_syncthreads(0, "__syncthreads"); }
static inline int __syncthreads_count(int predicate) {
    emulated_syncthreads(predicate, "__syncthreads_count");
    return (int)emulated_barrier.result_count;
}
static inline int __syncthreads_and(int predicate) {
    emulated_syncthreads(predicate, "__syncthreads_and");
    return emulated_barrier.result_count == emulated_barrier.result_arrived;
}
// In "barrier_or_thread_0" mode (threads one after another, thread 0 last): the OR over the threads run so far.
static bool emulated_block_or;
static inline int __syncthreads_or(int predicate) {
    if (emulated_thread < 0) { emulated_block_or |= predicate != 0; return emulated_block_or; }
    emulated_syncthreads(predicate, "__syncthreads_or");
    return emulated_barrier.result_count != 0;
}

// The calling lane's exchange, then the value of lane source(lane) (itself by CUDA's rules for `width`).
template <typename T, class Source>
static T emulated_shuffle(unsigned mask, T value, Source source, const char* what) {
    static_assert(sizeof(T) <= 8, "a shuffled value of at most 8 bytes");
    if (emulated_thread < 0) emulation_unreachable(what);
    const unsigned lane = (unsigned)emulated_thread & 31u, w = (unsigned)emulated_thread >> 5;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    emulated_warps[w].exchange(w, lane, bits, what);
    const unsigned from = source(lane);
    if (from != lane) {
        if (from >= 32 || !(mask >> from & 1u))
            emulated_fail(std::string(what) + ": reads lane " + std::to_string(from) + ", not in the mask");
        if (!(emulated_warps[w].present >> from & 1u))
            emulated_fail(std::string(what) + ": reads lane " + std::to_string(from) +
                          ", which has returned or does not exist (an undefined value on a GPU)");
    }
    T out;
    std::memcpy(&out, &emulated_warps[w].snapshot[from], sizeof(T));
    return out;
}
template <typename T> static T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emulated_shuffle(mask, v, [&](unsigned lane) {
        return (lane & ~(unsigned)(width - 1)) + ((unsigned)src & (unsigned)(width - 1)); }, "__shfl_sync");
}
template <typename T> static T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emulated_shuffle(mask, v, [&](unsigned lane) {
        return (lane & (unsigned)(width - 1)) + delta < (unsigned)width ? lane + delta : lane; }, "__shfl_down_sync");
}
template <typename T> static T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emulated_shuffle(mask, v, [&](unsigned lane) {
        return (lane & (unsigned)(width - 1)) >= delta ? lane - delta : lane; }, "__shfl_up_sync");
}
template <typename T> static T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emulated_shuffle(mask, v, [&](unsigned lane) {
        const unsigned to = lane ^ (unsigned)lane_mask;
        return to / (unsigned)width == lane / (unsigned)width ? to : lane; }, "__shfl_xor_sync");
}
// Votes over the mask's lanes, every one of which must take part.
static unsigned emulated_vote(unsigned mask, int predicate, const char* what) {
    if (emulated_thread < 0) emulation_unreachable(what);
    const unsigned lane = (unsigned)emulated_thread & 31u, w = (unsigned)emulated_thread >> 5;
    emulated_warps[w].exchange(w, lane, predicate != 0, what);
    if ((mask & emulated_warps[w].present) != mask)
        emulated_fail(std::string(what) + ": a lane of the mask has returned or does not exist");
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; ++l) ballot |= (unsigned)((mask >> l & 1u) && emulated_warps[w].snapshot[l]) << l;
    return ballot;
}
static inline unsigned __ballot_sync(unsigned mask, int p) { return emulated_vote(mask, p, "__ballot_sync"); }
static inline int __any_sync(unsigned mask, int p) { return emulated_vote(mask, p, "__any_sync") != 0; }
static inline int __all_sync(unsigned mask, int p) { return emulated_vote(mask, p, "__all_sync") == mask; }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { emulated_vote(mask, 0, "__syncwarp"); }

// Every (block, thread) of the grid in order; in "reverse" mode each block's threads from last to first.
template <class F> static int emulated_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                            unsigned bz, bool reverse, F thread) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const unsigned long long n = (unsigned long long)bx * by * bz;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                emulated_block_or = false;
                for (unsigned long long k = 0; k < n; ++k) {
                    const unsigned long long t = reverse ? n - 1 - k : k;
                    threadIdx = {(unsigned)(t % bx), (unsigned)((t / bx) % by),
                                 (unsigned)(t / ((unsigned long long)bx * by))};
                    thread();
                }
            }
    return 0;
}

static void emulated_fiber_main() {
    const int t = emulated_thread;
    try {
        emulated_body(emulated_body_argument);
    } catch (const EmulatedFailure&) {
    }
    emulated_fibers[t].state = kDone;
    emulated_warps[t >> 5].drop((unsigned)t >> 5, (unsigned)t & 31u);
    emulated_barrier.drop();
}  // returns to uc_link, the scheduler

// "threads" mode: the blocks one after another; in each, the fibers in thread order (even blocks) or reverse
// order (odd blocks), each until it returns or waits, round after round. No runnable fiber while some wait
// is a deadlock, reported at once. Returns nonzero (emulated_error says why) on a failure.
template <class F> static int emulated_grid_threads(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                                    unsigned bz, F thread) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const unsigned n = bx * by * bz;
    emulated_error.clear();
    emulated_failed = false;
    emulated_fibers.assign(n, EmulatedFiber{});
    if (emulated_stacks_size < n * kEmulatedStack) {
        std::free(emulated_stacks);
        emulated_stacks_size = n * kEmulatedStack;
        emulated_stacks = static_cast<char*>(std::malloc(emulated_stacks_size));
        if (emulated_stacks == nullptr) {
            emulated_stacks_size = 0;
            emulated_error = "no memory for the fibers' stacks";
            return 1;
        }
    }
    emulated_body = [](void* f) { (*static_cast<F*>(f))(); };
    emulated_body_argument = &thread;
    for (unsigned z = 0; z < gz && !emulated_failed; ++z)
        for (unsigned y = 0; y < gy && !emulated_failed; ++y)
            for (unsigned x = 0; x < gx && !emulated_failed; ++x) {
                blockIdx = {x, y, z};
                std::memset(emulated_dynamic_shared, 0xFF, sizeof emulated_dynamic_shared);
                emulated_barrier = EmulatedBlockBarrier{};
                emulated_barrier.live = n;
                for (unsigned w = 0; w < 32; ++w) {
                    const unsigned lanes = w * 32 >= n ? 0 : (n - w * 32 >= 32 ? 32 : n - w * 32);
                    emulated_warps[w] = EmulatedWarp{};
                    emulated_warps[w].live = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
                }
                for (unsigned t = 0; t < n; ++t) {
                    EmulatedFiber& f = emulated_fibers[t];
                    f.index = {t % bx, (t / bx) % by, t / (bx * by)};
                    f.state = kRunnable;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = emulated_stacks + (size_t)t * kEmulatedStack;
                    f.context.uc_stack.ss_size = kEmulatedStack;
                    f.context.uc_link = &emulated_scheduler;
                    makecontext(&f.context, emulated_fiber_main, 0);
                }
                // Odd blocks sweep their threads from last to first: a missing barrier then shows whether the
                // threads that read shared memory come before or after the ones that write it.
                const bool reverse = ((x + (unsigned long long)gx * (y + (unsigned long long)gy * z)) & 1) != 0;
                for (unsigned done = 0; done < n && !emulated_failed;) {
                    bool ran = false;
                    done = 0;
                    for (unsigned k = 0; k < n; ++k) {
                        const unsigned t = reverse ? n - 1 - k : k;
                        if (emulated_fibers[t].state == kRunnable) {
                            ran = true;
                            emulated_thread = (int)t;
                            threadIdx = emulated_fibers[t].index;
                            swapcontext(&emulated_scheduler, &emulated_fibers[t].context);
                        }
                        done += emulated_fibers[t].state == kDone;
                    }
                    if (!ran && done < n) {
                        // A fiber left waiting is abandoned: its stack is reused, nothing on it needs destroying.
                        // Which intrinsics the waiting threads are in, and how many in each.
                        std::vector<std::pair<std::string, unsigned>> waiting;
                        for (auto& f : emulated_fibers) {
                            if (f.state != kAtBarrier && f.state != kAtWarp) continue;
                            auto it = waiting.begin();
                            while (it != waiting.end() && it->first != f.waits_at) ++it;
                            if (it == waiting.end()) waiting.emplace_back(f.waits_at, 1u);
                            else ++it->second;
                        }
                        emulated_error = "a deadlock in block (" + std::to_string(x) + ", " + std::to_string(y) +
                                         ", " + std::to_string(z) + "): of " + std::to_string(n - done) +
                                         " live threads,";
                        for (auto& [what, count] : waiting)
                            emulated_error += " " + std::to_string(count) + " wait in " + what + ",";
                        emulated_error += " none can go on";
                        emulated_failed = true;
                    }
                }
            }
    emulated_thread = -1;
    return emulated_failed ? 1 : 0;
}

extern "C" const char* emulation_error() { return emulated_error.c_str(); }
"""

# The host stand-in for cuda_fp16.h: GCC's _Float16 (IEEE binary16, numpy's float16), rounded to nearest even.
_FAKE_CUDA_FP16 = r"""#pragma once
typedef _Float16 __half;
static inline float __half2float(__half h) { return (float)h; }
static inline __half __float2half_rn(float f) { return (__half)f; }
static inline __half __float2half(float f) { return (__half)f; }
"""

_C_SCALAR = {"int": "int", "unsigned int": "unsigned int", "long long": "long long",
             "unsigned long long": "unsigned long long", "float": "float", "double": "double", "bool": "bool"}


def entry_point(expression):
    """The exported name of the launcher of `expression`: launch_ and the expression with - as m and
    every other non-identifier character as _."""
    return "launch_" + re.sub(r"\W", "_", expression.replace(" ", "").replace("-", "m"))


def _launcher(filename, expression):
    signature = fake_cupy.kernel_signature(filename, expression)
    mode = emulation(filename, expression).mode
    unpacked = []
    for i, p in enumerate(signature.parameters):
        if p.pointer:
            unpacked.append(f"*({p.c_type}**)args[{i}]")
        else:
            unpacked.append(f"*({_C_SCALAR[p.c_type]}*)args[{i}]")
    call = expression.strip() + "(" + ", ".join(unpacked) + ")"
    if mode == "threads":
        run = f"return emulated_grid_threads(gx, gy, gz, bx, by, bz, [&] {{ {call}; }});"
    else:
        reverse = "true" if mode == "barrier_or_thread_0" else "false"
        run = f"return emulated_grid(gx, gy, gz, bx, by, bz, {reverse}, [&] {{ {call}; }});"
    return (f'extern "C" int {entry_point(expression)}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f'unsigned by, unsigned bz, void** args) {{\n    {run}\n}}\n')


_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)?"
                             r"([A-Za-z_][\w\s]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]")


def _host_text(filename):
    """The source for the host: dynamic shared memory (`extern __shared__ T name[]`, in a kernel's body) as a
    pointer to the prelude's 48 KiB static buffer."""
    return _DYNAMIC_SHARED.sub(r"\1* const \2 = reinterpret_cast<\1*>(emulated_dynamic_shared)",
                               read_kernel_source(filename))


_BUILD_DIR = []  # one temporary folder per process, removed at exit by tempfile's finaliser
_LIBRARIES = {}  # (source text, expressions, flags) -> ctypes.CDLL


def _build_dir():
    if not _BUILD_DIR:
        _BUILD_DIR.append(tempfile.TemporaryDirectory(prefix="fastface_emulated_kernels_"))
    return pathlib.Path(_BUILD_DIR[0].name)


def host_flags(options):
    """g++ flags matching the kernel file's NVRTC options."""
    flags = ["-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
    if "--fmad=false" in options or "-fmad=false" in options:
        flags.append("-ffp-contract=off")  # no a*b+c contraction, as NVRTC's --fmad=false
    return tuple(flags)


def library(filename, options=(), also=()):
    """The host build of kernels/<filename> with a launcher per emulatable declared kernel (and per kernel
    of `also`), a ctypes CDLL, or None when there is none. Built once per process for each source text,
    set of kernels and flags."""
    candidates = dict.fromkeys(declared_expressions(filename) + tuple(also))
    expressions = tuple(e for e in candidates if emulation(filename, e).runs)
    if not expressions:
        return None
    source = _host_text(filename)
    flags = host_flags(options)
    key = (source, expressions, flags)
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise NotEmulatable("no host C++ compiler (g++) to build the emulated kernels")
    names = [entry_point(e) for e in expressions]
    assert len(set(names)) == len(names), f"entry point names collide: {names}"
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    build = _build_dir() / f"{pathlib.Path(filename).stem}_{digest}"
    build.mkdir(exist_ok=True)
    (build / "cuda_fp16.h").write_text(_FAKE_CUDA_FP16)
    (build / filename).write_text(source)
    shim = _PRELUDE + f'#include "{filename}"\n\n' + "".join(_launcher(filename, e) for e in expressions)
    (build / "shim.cpp").write_text(shim)
    lib_path = build / "libemulated.so"
    result = subprocess.run([cxx, *flags, f"-I{build}", str(build / "shim.cpp"), "-o", str(lib_path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise NotEmulatable(f"the host build of kernels/{filename} failed:\n{result.stderr[-4000:]}")
    lib = ctypes.CDLL(str(lib_path))
    for name in names:
        getattr(lib, name).argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    lib.emulation_error.argtypes = []
    lib.emulation_error.restype = ctypes.c_char_p
    _LIBRARIES[key] = lib
    return lib


def _argument_storage(parameter, argument, null):
    """A ctypes object holding what the kernel parameter receives: a pointer's value, or a scalar's bytes."""
    if parameter.pointer:
        if argument is null:
            return ctypes.c_void_p(None)
        return ctypes.c_void_p(int(argument.ctypes.data))
    return ctypes.create_string_buffer(np.asarray(argument).tobytes(), np.asarray(argument).nbytes)


def launch(kernel_file, expression, grid, block, args):
    """Runs the declared kernel `expression` of `kernel_file` (a KernelFile) on the host over `grid` x `block`
    (tuples of 1 to 3 ints) with `args` as fake_cupy's checker accepted them. Raises NotEmulatable for a
    check-only kernel."""
    from fastface._backend import NULL_POINTER  # noqa: PLC0415

    filename = kernel_file.filename
    how = emulation(filename, expression)
    if not how.runs:
        raise NotEmulatable(f"kernels/{filename}: {expression} {how.reason}; it cannot run on the host")
    if how.mode == "barrier_or_thread_0" and any(b != 1 for b in block[1:]):
        raise NotEmulatable(f"kernels/{filename}: {expression}: the modelled __syncthreads_or needs a 1-D block; "
                            f"got {block}")
    lib = library(filename, kernel_file.options, kernel_file.kernels)
    signature = fake_cupy.kernel_signature(filename, expression)
    storage = [_argument_storage(p, a, NULL_POINTER) for p, a in zip(signature.parameters, args)]
    pointers = (ctypes.c_void_p * max(1, len(storage)))(*[ctypes.addressof(s) for s in storage])
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    if getattr(lib, entry_point(expression))(*g, *b, pointers) != 0:
        raise fake_cupy.LaunchError(f"kernels/{filename}: {expression} over grid {g}, block {b}: "
                                    f"{lib.emulation_error().decode()}")
