#!/usr/bin/env python3
"""Carry torch.compile's on-disk cache from one machine to another, in parts small enough to travel.

    python3 tools/compile_cache.py pack OUT_DIR [--cache-dir DIR] [--part-mib 15] [--max-parts 3]
    python3 tools/compile_cache.py unpack IN_DIR [--cache-dir DIR]

A fresh machine compiles every graph of a run from nothing: for `PRESET=frontier` on one H100 (2026-12-07) the
training's warm-up of its four graphs took 304 s cold and 36 s with the inductor's cache warm, and its
evaluation's two warm-ups 168 s cold. The cache is a folder (`TORCHINDUCTOR_CACHE_DIR`, by default
`/tmp/torchinductor_<user>`) holding inductor's compiled graphs, AOTAutograd's, and the Triton kernels under
`triton/` (unless TRITON_CACHE_DIR sends them elsewhere); a run
whose graphs are found there (same torch, Triton, GPU kind and graph) loads them instead of compiling.

`pack` writes that folder as one xz-compressed tar split into parts of at most --part-mib MiB each
(`compile_cache.tar.xz.000`, `.001`, ...) beside a manifest, `compile_cache.json`: each part's bytes and
sha256, the file count, and the torch and Triton versions and GPU that wrote it. A cache larger than
--max-parts parts is refused and nothing is left in OUT_DIR. `unpack` checks every part against the
manifest before it extracts anything, then extracts into the cache folder (entries already there are
replaced); it warns when torch or Triton differ from the manifest's, whose entries would then simply miss.

Where a cache can live on a disk that outlasts the machine (a volume on a rented pod), pointing
TORCHINDUCTOR_CACHE_DIR at it does the same without this tool. The tool is for machines that only pass files
through a size-limited folder: the project's device calls, whose returned files are capped at 16 MiB each and
8 a call (`records/proxy_1gpu_frontier_vs_pr1529/README.md` says how its series use it).
"""
import argparse
import getpass
import hashlib
import io
import json
import lzma
import os
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "compile_cache.json"
PART_PREFIX = "compile_cache.tar.xz."


def fail(message: str) -> None:
    print(f"compile_cache: {message}", file=sys.stderr)
    sys.exit(1)


def default_cache_dir() -> Path:
    """The folder torch.compile uses here: TORCHINDUCTOR_CACHE_DIR when set, else torch's own default."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
        return Path(torch_default())
    except ImportError:  # torch's rule, for a torch without that module
        return Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"


def versions() -> dict:
    """What decides whether a packed cache can hit on this machine."""
    info = {}
    try:
        import torch
        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        info["torch"], info["gpu"] = "none", "none"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    return info


class PartWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most part_bytes each, hashing them, and
    stops with an error once more than max_parts would be needed."""

    def __init__(self, folder: Path, part_bytes: int, max_parts: int):
        self.folder, self.part_bytes, self.max_parts = folder, part_bytes, max_parts
        self.parts: list = []  # [path, bytes, sha256 object]
        self.file = None

    def writable(self) -> bool:
        return True

    def _next_part(self) -> None:
        self._close_part()
        if len(self.parts) == self.max_parts:
            raise OverflowError
        path = self.folder / f"{PART_PREFIX}{len(self.parts):03d}"
        self.file = open(path, "wb")
        self.parts.append([path, 0, hashlib.sha256()])

    def _close_part(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            if self.file is None or self.parts[-1][1] == self.part_bytes:
                self._next_part()
            part = self.parts[-1]
            chunk = data[done:done + self.part_bytes - part[1]]
            self.file.write(chunk)
            part[2].update(chunk)
            part[1] += len(chunk)
            done += len(chunk)
        return done

    def close(self) -> None:
        self._close_part()
        super().close()


def cache_files(cache_dir: Path) -> list:
    """Regular files under the cache, sorted, without lock files (a lock is a process's, not the cache's)."""
    return sorted(p for p in cache_dir.rglob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".lock")


def pack(out_dir: Path, cache_dir: Path, part_mib: float, max_parts: int, preset: int) -> dict:
    if not cache_dir.is_dir():
        fail(f"no compile cache at {cache_dir} (set --cache-dir or TORCHINDUCTOR_CACHE_DIR to the folder a run "
             "compiled into)")
    if os.environ.get("TRITON_CACHE_DIR"):  # else Triton's kernels live in <cache>/triton/<device>, packed here
        print(f"compile_cache:warning TRITON_CACHE_DIR={os.environ['TRITON_CACHE_DIR']} keeps Triton's kernels "
              f"outside {cache_dir}: they are not packed, and a machine that unpacks this compiles them again",
              file=sys.stderr)
    files = cache_files(cache_dir)
    if not files:
        fail(f"the compile cache at {cache_dir} holds no files: nothing to pack")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out_dir.iterdir() if p.name == MANIFEST or p.name.startswith(PART_PREFIX)]
    if stale:
        fail(f"{out_dir} already holds a packed cache ({stale[0].name}): pack into an empty folder")
    start = time.perf_counter()
    writer = PartWriter(out_dir, max(1, int(part_mib * 2**20)), max_parts)
    raw_bytes = 0
    try:
        with lzma.open(writer, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
            for path in files:
                tar.add(path, arcname=str(path.relative_to(cache_dir)), recursive=False)
                raw_bytes += path.stat().st_size
    except OverflowError:
        writer.close()
        for part in writer.parts:
            part[0].unlink(missing_ok=True)
        fail(f"the compile cache at {cache_dir} ({raw_bytes / 2**20:.0f} MiB read before the limit) packs to more "
             f"than --max-parts {max_parts} x --part-mib {part_mib:g} MiB; nothing was written to {out_dir}. Give "
             "more parts, or clear the cache and compile only the runs you need")
    writer.close()
    manifest = dict(
        format=1, files=len(files), raw_bytes=raw_bytes, seconds=round(time.perf_counter() - start, 1),
        parts=[dict(name=p[0].name, bytes=p[1], sha256=p[2].hexdigest()) for p in writer.parts], **versions())
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    packed = sum(p["bytes"] for p in manifest["parts"])
    print(f"compile_cache:packed files:{len(files)} raw_mib:{raw_bytes / 2**20:.1f} packed_mib:{packed / 2**20:.1f} "
          f"parts:{len(writer.parts)} seconds:{manifest['seconds']} torch:{manifest['torch']} "
          f"triton:{manifest['triton']} gpu:{manifest['gpu'].replace(' ', '_')} out:{out_dir}")
    return manifest


class PartReader(io.RawIOBase):
    """The parts, read back to back as one stream."""

    def __init__(self, paths: list):
        self.paths, self.file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.file is None:
                if not self.paths:
                    return 0
                self.file = open(self.paths.pop(0), "rb")
            n = self.file.readinto(buffer)
            if n:
                return n
            self.file.close()
            self.file = None


@contextmanager
def archive(paths: list):
    """The tar archive the parts hold, read as one stream (each pass over it opens it again)."""
    with lzma.open(io.BufferedReader(PartReader(paths)), "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        yield tar


def unpack(in_dir: Path, cache_dir: Path) -> dict:
    manifest_path = in_dir / MANIFEST
    if not manifest_path.is_file():
        fail(f"no {MANIFEST} in {in_dir}: give the folder that `compile_cache.py pack` wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
        parts = manifest["parts"]
    except (ValueError, KeyError) as error:
        fail(f"{manifest_path} is not a compile-cache manifest ({error}); pack the cache again")
    paths = []
    for part in parts:  # every part checked before anything is extracted: no half-unpacked cache
        path = in_dir / part["name"]
        if not path.is_file():
            fail(f"{path} is missing ({len(parts)} parts listed in {manifest_path}); copy every part")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.stat().st_size != part["bytes"] or digest != part["sha256"]:
            fail(f"{path} does not match {manifest_path} (bytes or sha256 differ): the part is damaged or from "
                 "another pack; copy it again")
        paths.append(path)
    here = versions()
    for key in ("torch", "triton"):
        if manifest.get(key) != here.get(key):
            print(f"compile_cache:warning {key} here is {here.get(key)}, the cache's is {manifest.get(key)}: its "
                  "entries will not be found, and the run compiles afresh", file=sys.stderr)
    start = time.perf_counter()
    # Two passes over the stream: the first checks every entry with tarfile's "data" filter (no absolute paths,
    # no links or names leading out of the folder, no devices), so a bad archive is refused before one file is
    # written; the second extracts.
    try:
        with archive(paths) as tar:
            for member in tar:
                tarfile.data_filter(member, str(cache_dir))
    except (tarfile.TarError, lzma.LZMAError, EOFError) as error:
        fail(f"the archive in {in_dir} cannot be unpacked safely ({type(error).__name__}: {error}); nothing was "
             "extracted. Pack the cache again")
    cache_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with archive(paths) as tar:
        for member in tar:
            tar.extract(member, cache_dir, filter="data")
            count += member.isfile()
    print(f"compile_cache:unpacked files:{count} parts:{len(paths)} seconds:{time.perf_counter() - start:.1f} "
          f"into:{cache_dir} written_by:torch_{manifest.get('torch')}/triton_{manifest.get('triton')}/"
          f"{str(manifest.get('gpu')).replace(' ', '_')}")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack", help="write the cache as parts + manifest into OUT_DIR")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--part-mib", type=float, default=15.0, help="largest part, MiB (default 15: under 16 MiB)")
    p.add_argument("--max-parts", type=int, default=3, help="refuse a cache that needs more parts (default 3)")
    p.add_argument("--preset", type=int, default=6, choices=range(10), help="xz preset (default 6)")
    u = verbs.add_parser("unpack", help="check and extract the parts in IN_DIR into the cache")
    u.add_argument("in_dir", type=Path)
    for sub in (p, u):
        sub.add_argument("--cache-dir", type=Path, default=None,
                         help="the cache folder (default: TORCHINDUCTOR_CACHE_DIR, else torch's default)")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    if args.verb == "pack":
        if args.part_mib <= 0 or args.max_parts < 1:
            fail("--part-mib must be above 0 and --max-parts at least 1")
        pack(args.out_dir, cache_dir, args.part_mib, args.max_parts, args.preset)
    else:
        unpack(args.in_dir, cache_dir)


if __name__ == "__main__":
    main()
