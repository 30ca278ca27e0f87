"""Value checks on cupy arrays that run on the GPU and report without making the host wait.

A value check (NaN, an index out of range, a point behind the camera) must read the data. On the
GPU, bringing the verdict to the host is a synchronisation: the host waits for all queued work,
which costs more than a small op and stalls the pipeline of launches. Here each check is one
launch of kernels/checks.cu's `flag_values_outside` on the caller's stream. The kernel writes only
when it finds a bad value, and it writes into a record in pinned host memory. The host reads the
record's first word, a plain memory read with no CUDA call, at the start of every later checked
call. When the word is set, that call raises the ValueError of the earliest check that failed.
The message names the argument, its dtype and shape, and the problem.

The price is that a failure surfaces at a later fastface call, not in the call that got the bad
input. `check_device_errors()` waits for the device and raises at once: call it where you need an
answer now (after a step, before a checkpoint, in tests). `fastface.value_checks("sync")` brings back
the immediate checks, with counts and ranges, at the cost of one synchronisation per check.
A failure still unread when the interpreter exits is printed to stderr.

Slots: check number g writes g into slot g % _SLOTS and then into word 0. The host remembers
(g, message) per slot, so a slot reused by a later check cannot be blamed for an older failure.
When more than _SLOTS checks were queued before the host read a failure, the failure's message is
lost and a generic one is raised instead.
"""
import atexit
import ctypes
import itertools
import sys
import threading

import numpy as np

from fastface._backend import KernelFile, cupy_or_none

__all__ = ["queue_check", "raise_failed_checks", "check_device_errors"]

_SLOTS = 4096
_BLOCK = 256
_MAX_BLOCKS = 1024  # grid-stride beyond: ~8 blocks per SM on an H100/H200 is plenty for one pass

# dtype -> (the kernel's template arguments: element type, bound type; the bound's dtype)
_VARIANTS = {
    np.dtype(np.float16): ("__half, float", np.float32),
    np.dtype(np.float32): ("float, float", np.float32),
    np.dtype(np.float64): ("double, double", np.float64),
    np.dtype(np.int32): ("int, int", np.int32),
}
_KERNELS = KernelFile("checks.cu", tuple(f"flag_values_outside<{t}>" for t, _ in _VARIANTS.values()))


class _Record:
    """The words the check kernels write (word 0, then one per slot), and what the host knows of each slot."""

    def __init__(self, words, address):
        self.words = words  # numpy uint64 view of the record, 1 + _SLOTS words
        self.address = address  # where the kernels write it
        self.messages = [None] * _SLOTS  # slot -> (generation, format string, format arguments)
        self.generations = itertools.count(1)
        self.devices = set()

    @classmethod
    def pinned(cls):
        """A record in pinned host memory. Unified addressing maps pinned memory into every device's
        address space at its host address, so the kernels take that address as is; the Portable and
        Mapped flags say so explicitly."""
        runtime = cupy_or_none().cuda.runtime
        n_words = 1 + _SLOTS
        address = runtime.hostAlloc(8 * n_words, runtime.hostAllocMapped | runtime.hostAllocPortable)
        words = np.ctypeslib.as_array((ctypes.c_uint64 * n_words).from_address(address))
        words[:] = 0
        return cls(words, address)

    def register(self, message, message_args):
        """Takes the slot of the next check; returns (slot, generation)."""
        generation = next(self.generations)
        slot = generation % _SLOTS
        self.messages[slot] = (generation, message, message_args)
        return slot, generation

    def take_failures(self):
        """The (generation, message) of every failed check not yet reported, oldest first."""
        if not self.words[0]:
            return []
        # Cleared before the scan: a check that fails during the scan sets it again, and is found then.
        self.words[0] = 0
        failed = []
        for slot, entry in enumerate(self.messages):
            if entry is not None and int(self.words[1 + slot]) == entry[0]:
                failed.append((entry[0], entry[1].format(*entry[2])))
                self.messages[slot] = None
        if not failed:
            failed.append((0, f"a value check failed on the GPU, but more than {_SLOTS} later checks reused its "
                              f"record before it was read, so what it found is lost"))
        return sorted(failed)


_record = None
_record_lock = threading.Lock()


def _the_record():
    global _record
    if _record is None:
        with _record_lock:
            if _record is None:
                _record = _Record.pinned()
                atexit.register(_report_at_exit)
    return _record


def _failure_text(failed):
    text = (f"{failed[0][1]} (found on the GPU by a value check that ran after an earlier fastface call returned; "
            f"run inside fastface.value_checks('sync') to stop at that call)")
    if len(failed) > 1:
        text += f"; {len(failed) - 1} later checks failed too, the first: {failed[1][1]}"
    return text


def raise_failed_checks():
    """Raises ValueError for the earliest failed check that the GPU has recorded so far. It does not wait."""
    if _record is not None:
        failed = _record.take_failures()
        if failed:
            raise ValueError(_failure_text(failed))


def check_device_errors():
    """Waits for the work queued on every device that fastface has checked, then raises the earliest failed check.

    The value checks on cupy arrays run on the GPU and are reported at the next fastface call that
    checks values. Call this where the answer is needed now, for example at the end of a training step.
    """
    if _record is None:
        return
    cupy = cupy_or_none()
    for device_id in sorted(_record.devices):
        with cupy.cuda.Device(device_id):
            cupy.cuda.runtime.deviceSynchronize()
    raise_failed_checks()


def queue_check(a, lo, hi, message, *message_args, offset=0, stride=1, count=None):
    """Queues a check on the current stream that `lo <= x <= hi` for every x among `count` elements
    a.flat[offset + i * stride] (all of `a` by default); NaN always fails.

    `message.format(*message_args)` is the ValueError's text. It is formatted only on failure, and
    message_args hold no arrays, so no array is kept alive. Raises first when an earlier check has
    already failed. Returns False, having queued nothing, when `a`'s dtype has no check kernel; the
    caller then checks on the host.
    """
    variant = _VARIANTS.get(a.dtype)
    if variant is None:
        return False
    template_arguments, bound = variant
    record = _the_record()
    raise_failed_checks()
    if count is None:
        count = a.size
    if count == 0:
        return True
    if not a.flags.c_contiguous:
        a = cupy_or_none().ascontiguousarray(a)
    slot, generation = record.register(message, message_args)
    record.devices.add(a.device.id)
    blocks = min(_MAX_BLOCKS, -(-count // _BLOCK))
    _KERNELS(f"flag_values_outside<{template_arguments}>")(
        (blocks,), (_BLOCK,),
        (a, np.int64(count), np.int64(offset), np.int64(stride), bound(lo), bound(hi),
         np.uint64(record.address), np.int32(slot), np.uint64(generation)))
    return True


def _report_at_exit():
    try:
        check_device_errors()
    except ValueError as err:
        sys.stderr.write(f"fastface: a GPU value check failed and was never reported: {err}\n")
    except Exception:  # the CUDA context may already be gone, or in an error state; nothing to add then
        pass
