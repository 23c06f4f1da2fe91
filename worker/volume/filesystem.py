"""Measuring a filesystem volume: one `statvfs`.

A module of its own rather than beside `Usage` in `levels.py`: it is the package's one call into
the operating system, which keeps `levels.py` pure, and it is what the filesystem store imports
(`FilesystemStore.usage()`) without taking in anything else of the volume monitor.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker.volume.levels import Usage


def filesystem_usage(path: Path) -> Usage:
    """Bytes and inodes of the filesystem holding `path`, counted the way `df` counts them.

    The total is what unprivileged processes can use (used + available), not the raw size: blocks
    reserved for root are never ours, so a volume is full for the media service when `f_bavail`
    reaches zero, and `df`'s Use% (which operators compare against) divides by the same total.
    """
    st = os.statvfs(path)
    used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
    total_bytes = used_bytes + st.f_bavail * st.f_frsize
    used_inodes = total_inodes = None
    # Some filesystems (btrfs, many NFS/EFS mounts) report no inode counts: inodes cannot run out there.
    if st.f_files:
        used_inodes = st.f_files - st.f_ffree
        total_inodes = used_inodes + st.f_favail
    return Usage(used_bytes=used_bytes, total_bytes=total_bytes, used_inodes=used_inodes, total_inodes=total_inodes)
