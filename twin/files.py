"""Files that hold secrets or private data: the state directory (0700) and what is in it (0600).

The state directory holds the registry (users' password hashes, device key hashes, the audit
log), the JWT signing secret, the broker's persisted sessions and messages, and the time series:
nothing in it is for other local users. Directories are created 0700 and files 0600 whatever the
umask, and ones left world-readable by an earlier version are tightened when opened. Used by
every layer that writes there (registry, mqtt, timeseries, api), so it sits at the bottom next
to ``errors``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def _tighten(path: Path, mode: int) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        return  # not ours to change (a shared mount, root's directory): leave it be
    if stat.S_IMODE(st.st_mode) & ~mode:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
            log.info("files: %s was readable by others; now %o", path, stat.S_IMODE(st.st_mode) & mode)


def private_dir(path: str | os.PathLike[str], *, tighten: bool = True) -> Path:
    """Create ``path`` mode 0700 (missing parents: the usual mode), or, with ``tighten``,
    take group/other access away from an existing one. Without ``tighten`` an existing
    directory is left as it is (one the user chose for a registry file, say their home)."""
    p = Path(path)
    if p.is_dir():
        if tighten:
            _tighten(p, DIR_MODE)
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        p.mkdir(mode=DIR_MODE)
        os.chmod(p, DIR_MODE)  # mkdir's mode goes through the umask
    return p


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` empty mode 0600 if missing, or tighten an existing one to 0600."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        _tighten(p, FILE_MODE)
    else:
        os.close(fd)
    return p


def tighten_file(path: str | os.PathLike[str]) -> None:
    """Tighten an existing file to 0600 (no-op if missing)."""
    _tighten(Path(path), FILE_MODE)
