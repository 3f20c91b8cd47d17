"""Read and write token shards in the Parameter Golf challenge format.

A shard is a 1024-byte header of 256 little-endian int32 values followed by
the tokens as little-endian uint16:

    header[0] = 20240520   (magic)
    header[1] = 1          (version)
    header[2] = number of tokens
    header[3:] = 0

so a valid shard is exactly ``1024 + 2 * header[2]`` bytes long. Only numpy
is needed. The module also holds ``die()``, the one-line error exit shared by
the data tools, so that every script fails the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = np.iinfo(np.uint16).max  # 65535: tokens are stored as uint16


class ShardFormatError(ValueError):
    """A file that is not a well-formed challenge shard; ``reason`` omits the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def die(msg: str) -> None:
    """Print ``error: msg`` on one line to stderr and exit with status 1."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write ``tokens`` (1-D ints in [0, 65535]) as a shard; return the count.

    The file is written under a temporary name and renamed into place, so a
    crash never leaves a truncated shard under the final name.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise ValueError(
            f"token ids must be in [0, {MAX_TOKEN_ID}], got [{int(arr.min())}, {int(arr.max())}]"
        )
    if arr.size > np.iinfo(np.int32).max:
        raise ValueError(f"{arr.size} tokens do not fit the int32 count field")

    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype("<u2", copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if writing failed
    return int(arr.size)


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and file size; return its token count.

    Reads only the 1024 header bytes, so it is cheap enough to check every
    shard of a 200 MB download.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardFormatError(path, f"{size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardFormatError(path, f"bad magic {header[0]} (expected {MAGIC}); not a challenge shard")
    if header[1] != VERSION:
        raise ShardFormatError(path, f"unsupported version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardFormatError(
            path, f"header says {count} tokens ({expected} bytes) but the file has {size} bytes"
        )
    return count


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Return the tokens of a shard as a uint16 array, after validating it."""
    count = read_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
