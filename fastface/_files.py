"""Atomic file writes: a save either replaces the target completely or leaves it as it was.

A writer that opens its target directly (`h5py.File(path, "w")`) truncates it first, so a crash,
a full disk or an exception half-way through destroys the previous checkpoint. `atomic_write`
hands the writer a temporary path in the target's own directory (same filesystem, so the final
rename is atomic), and only when the writer has finished does it flush the data to disk and
`os.replace` the temporary over the target:

    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ...

On any exception the temporary is removed and the exception goes on; the target is untouched.
Base layer, like `_checks.py`: imports nothing from fastface.
"""
import contextlib
import os
import secrets
import stat

__all__ = ["atomic_write"]


def _fsync_path(path, directory=False):
    """Flushes a file (or, where the platform allows, a directory entry) to the disk."""
    if directory and os.name == "nt":
        return  # Windows cannot open a directory for fsync; NTFS journals the rename itself
    flags = os.O_RDONLY if directory else os.O_RDWR  # Windows' fsync needs a writable handle
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except OSError:
        if directory:
            return  # some filesystems refuse to open directories: the file's data is already flushed
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _new_temporary(directory, name, suffix):
    """Creates an empty, unused file next to the target; returns its path.

    Mode 0o666 before the umask, as an ordinary `open(path, "w")` would give (mkstemp's 0o600
    would leave a checkpoint readable by its owner only)."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {os.path.join(directory, name)}")


@contextlib.contextmanager
def atomic_write(path, suffix=None):
    """Yields a temporary path to write; on success moves it over `path` in one step.

    path: the target file (str or path-like). Its directory must exist.
    suffix: the temporary's file name ending; default the target's own extension (writers such
        as cv2.imwrite choose the format by it).

    On success the temporary's data is fsynced, `os.replace`d over `path` (keeping the mode of a
    file it replaces) and the directory is fsynced where the platform allows. On any exception
    inside the block the temporary is removed, the exception re-raised, and `path` is untouched.
    Raises FileNotFoundError naming the path when its directory does not exist, and
    IsADirectoryError when `path` is a directory.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    directory, name = os.path.split(os.path.abspath(path))
    if not name or os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory, not a file")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the directory {directory} does not exist")
    if suffix is None:
        suffix = os.path.splitext(name)[1]
    tmp = _new_temporary(directory, name, suffix)
    try:
        yield tmp
        try:
            old_mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            old_mode = None
        if old_mode is not None:
            os.chmod(tmp, old_mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_path(directory, directory=True)
