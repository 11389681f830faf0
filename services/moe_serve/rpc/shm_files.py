"""The /dev/shm files behind shared-memory regions, opened and cleaned up safely.

A region's name comes from the caller, and /dev/shm is writable by every user of the host. So an
expert server opens a named region only if it is a regular file (never through a symlink, never a
FIFO or device) owned by the server's own user, at least as large as the caller says, and beginning
with the key the caller sends. Every refusal gets the same answer: which of these checks failed
would otherwise tell a local attacker whether some file exists, how large it is, or what its first
bytes are.

A gateway killed with SIGKILL leaves its regions (`moe-<pid>-<random>`) behind; `remove_stale`
unlinks the ones of this user whose process is gone, at the gateway's start.
"""

from __future__ import annotations

import errno
import hmac
import logging
import mmap
import os
import re
import stat
from pathlib import Path

log = logging.getLogger(__name__)

# open(2) flags for a caller-named region: no symlink followed, no blocking on a FIFO, not inherited.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MADE_BY_PID = re.compile(r"^moe-(\d+)-[0-9a-f]+$")  # the names ArenaPool gives its regions


def refusal(field: str, name: str) -> str:
    """The one message of every refused region, whatever the reason."""
    return (f"{field}: shared memory {name!r} is not a region this server can use (it must exist on this host, "
            "be a regular file of the server's user, hold the size given and begin with the key sent); "
            "send the tensor in the message")


def map_region(directory: Path, name: str, size: int, key: bytes, key_bytes: int) -> mmap.mmap | None:
    """`size` bytes of the region file `directory/name` mapped read-write, or None if any check fails
    (`key` must be `key_bytes` long and equal the file's first bytes). Why is logged here, at DEBUG (an
    error of this process's own, such as running out of file descriptors, at WARNING), never answered."""
    mapped, why = _map(directory / name, size, key, key_bytes)
    if mapped is None:
        log.log(logging.DEBUG if why in _REFUSALS else logging.WARNING, "shared memory %r not mapped: %s", name, why)
    return mapped


_REFUSALS = {"key length", "cannot open", "not a regular file", "another user's", "too small", "wrong key"}
_ABOUT_THE_FILE = {errno.ENOENT, errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENOTDIR, errno.EISDIR,
                   errno.ENODEV, errno.EROFS, errno.ETXTBSY, errno.EOPNOTSUPP}


def _map(path: Path, size: int, key: bytes, key_bytes: int) -> tuple[mmap.mmap | None, str]:
    if len(key) != key_bytes:
        return None, "key length"
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        return None, "cannot open" if err.errno in _ABOUT_THE_FILE else f"open: {err}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_uid != os.geteuid():
            return None, "another user's"
        if st.st_size < max(size, key_bytes):
            return None, "too small"
        mapped = mmap.mmap(fd, size)
    except (OSError, ValueError) as err:
        return None, f"mmap: {err}"
    finally:
        os.close(fd)
    if not hmac.compare_digest(mapped[:key_bytes], key):
        mapped.close()
        return None, "wrong key"
    return mapped, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale(directory: Path) -> list[str]:
    """Unlink the regions in `directory` that this user's processes made and that outlived them; their names.

    Only `moe-<pid>-<hex>` regular files owned by this user whose pid is not running are removed
    (a pid reused by another process keeps its files: they are left, never guessed about).
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _MADE_BY_PID.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or _alive(int(match.group(1))):
            continue
        try:
            os.unlink(entry.path)
        except OSError as err:
            log.warning("could not remove stale shared memory %s: %s", entry.path, err)
            continue
        removed.append(entry.name)
    return removed
