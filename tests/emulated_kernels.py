"""The kernels of kernels/*.cu compiled for the host, one thread after another, for tests/fake_cupy.py's compute mode.

A kernel whose threads never wait for or talk to each other (no barrier, no shuffle or vote, no shared
memory) gives the same result whatever order its threads run in, up to the order of its atomics. Such a
kernel runs here as a plain loop over (block, thread), each iteration calling the kernel's own code with
blockIdx/threadIdx set: `emulation(filename, expression)` says whether a declared kernel is one, and
`launch(...)` runs it on the memory of fake cupy arrays (real host addresses).

How the host build works: the source as `fastface._backend.read_kernel_source` gives it (the kernels/
headers pasted in, as NVRTC sees it) is written to a temporary file and included by a generated C++ shim
that defines the CUDA built-ins the files use (`_PRELUDE`: __global__ & co. as nothing, float2/float4,
bit casts, atomics as plain read-modify-writes, __half as GCC's _Float16) and exports, for every declared
kernel of the file that can be emulated, `extern "C" void launch_<name>(gx, gy, gz, bx, by, bz, void** args)`,
which unpacks args[i] by the parameter's C type (the signature tests/fake_cupy.py parses) and runs the grid.
One shared library per (source text, declared kernels, flags), built once per process. A file compiled
with --fmad=false is built with -ffp-contract=off, so its float32 arithmetic rounds like the Numba twin's.
Barrier and shuffle intrinsics are declared so that the other kernels of a file compile, and abort if one
is ever reached.

Which kernels can be emulated is decided per kernel, from the text of its definition and of everything
it names that the file defines (device functions, structs, constants, macros), transitively: any of
`_NEEDS_THREADS_TOGETHER` there makes the kernel check-only. One barrier is modelled: a block-wide
`__syncthreads_or(x)` whose result only thread 0 acts on (`if (__syncthreads_or(x) && threadIdx.x == 0)`,
kernels/checks.cu's value checks). Such a kernel runs each block's threads in reverse order, thread 0
last, with `__syncthreads_or` returning the OR over the threads run so far: thread 0 then sees the OR of
the whole block, which is all the kernel uses. It is allowed only on 1-D blocks, and only when the
kernel's text has that exact form (`_BARRIER_OR_FOR_THREAD_0`).

What this checks and what it does not: the kernels' arithmetic, indexing and argument unpacking, and the
Python side around them (allocation, aliasing, template choice, accumulators), against the CPU path. Not
the GPU's scheduling, memory model, contraction of a*b+c where --fmad=false is not given, or its libm
(sincosf, sqrtf, division round differently on a GPU: compare with the GPU-vs-CPU tolerances).
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

# The one barrier modelled (see the module docstring): the kernel body must contain exactly this.
_BARRIER_OR_FOR_THREAD_0 = re.compile(r"if\s*\(\s*__syncthreads_or\s*\(\s*\w+\s*\)\s*&&\s*threadIdx\.x\s*==\s*0\s*\)")


class NotEmulatable(AssertionError):
    """A launch that compute mode was asked to run but cannot."""


class Emulation:
    """Whether and how one kernel runs on the host.

    mode: "sequential" (blocks and threads in order), "barrier_or_thread_0" (each block's threads in
    reverse order, see the module docstring), or None (check-only); reason: why, in words.
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
    return Emulation(None, f"uses {', '.join(found)}")


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
// CUDA built-ins for a host build that runs a grid's threads one after another (tests/emulated_kernels.py).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __constant__ static
#define __shared__ static
#define __align__(n) alignas(n)
using std::isfinite;
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct dim3 { unsigned int x, y, z; };
static dim3 blockIdx, blockDim, threadIdx, gridDim;
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
// Atomics: plain read-modify-writes, which is what they are when threads run one at a time.
static inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }
static inline int atomicAdd(int* p, int v) { const int o = *p; *p = o + v; return o; }
static inline int atomicSub(int* p, int v) { const int o = *p; *p = o - v; return o; }
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    const unsigned long long o = *p; if (v < o) *p = v; return o;
}
template <typename T> static inline T __ldg(const T* p) { return *p; }
static inline void __threadfence() {}
static inline void __threadfence_system() {}
// The one modelled barrier (see tests/emulated_kernels.py): the OR over the block's threads run so far.
static bool emulated_block_or;
static inline int __syncthreads_or(int predicate) { emulated_block_or |= predicate != 0; return emulated_block_or; }
// Declared so that a file's other kernels compile; never reached by an emulated kernel.
[[noreturn]] static void emulation_unreachable(const char* what) {
    std::fprintf(stderr, "tests/emulated_kernels.py: %s reached in a host-emulated kernel\n", what);
    std::abort();
}
static inline void __syncthreads() { emulation_unreachable("__syncthreads"); }
template <typename T> static inline T __shfl_down_sync(unsigned, T, int, int = 32) {
    emulation_unreachable("__shfl_down_sync");
}

// Every (block, thread) of the grid in order; in "reverse" mode each block's threads from last to first.
template <class F> static void emulated_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
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
}
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
    reverse = "true" if mode == "barrier_or_thread_0" else "false"
    return (f'extern "C" void {entry_point(expression)}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f'unsigned by, unsigned bz, void** args) {{\n'
            f"    emulated_grid(gx, gy, gz, bx, by, bz, {reverse}, [&] {{ {call}; }});\n}}\n")


def _host_text(filename):
    """The source for the host: dynamic shared memory (never used by an emulated kernel) as a static array."""
    return re.sub(r"extern\s+__shared__\s+([^;\[]+?)\s*\[\s*\]", r"__shared__ \1[1]", read_kernel_source(filename))


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
        getattr(lib, name).restype = None
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
    getattr(lib, entry_point(expression))(*g, *b, pointers)
