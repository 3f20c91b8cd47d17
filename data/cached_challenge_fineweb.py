"""Download the official Parameter Golf FineWeb shards and tokenizer from Hugging Face.

    python3 data/cached_challenge_fineweb.py --variant sp8192 [--train-shards N] [--local-dir data]

The dataset repo is $MATCHED_FINEWEB_REPO_ID (default kevclark/parameter-golf,
repo_type "dataset"); its files may sit under the folder
$MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default: the repo root). Layout, mirrored
under --local-dir:

    manifest.json
    datasets/fineweb10B_sp{V}/fineweb_val_000000.bin ...    (all are fetched)
    datasets/fineweb10B_sp{V}/fineweb_train_000000.bin ...  (the first N, default 80)
    tokenizers/fineweb_{V}_bpe.model and .vocab

manifest.json (kept locally once fetched; delete it to refresh) has a
"datasets" entry named fineweb10B_sp{V} whose "stats" give files_val and
files_train and whose "tokenizer_name" names a "tokenizers" entry with
model_path / vocab_path. An entry may list byte sizes under "files", either
{"name": bytes} or [{"name" or "path": ..., "bytes" or "size": ...}]; listed
sizes are checked. Without a manifest, or without this variant in it, the
conventional names above are used and val shards are fetched until the next
index does not exist.

Resumable: a file already present with the right size (and, for a shard, a
valid header) is skipped. Each file is downloaded into a temporary folder next
to its destination, checked, then renamed into place, so an interrupted run
never leaves a half-written file under a final name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_io import ShardFormatError, die, read_header  # noqa: E402

VARIANTS = ("sp1024", "sp4096", "sp8192")
DEFAULT_REPO_ID = "kevclark/parameter-golf"
DEFAULT_TRAIN_SHARDS = 80


def fetch(repo_id: str, remote_path: str, staging_dir: Path) -> Path | None:
    """Download one file of the dataset repo into ``staging_dir``; None if the repo lacks it.

    This is the only code that touches the network; tests replace
    ``hf_hub_download`` with a fake that serves files from a folder.
    """
    try:
        path = hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset", local_dir=staging_dir)
    except LocalEntryNotFoundError:  # offline; a subclass of EntryNotFoundError, so caught first
        die(f"cannot reach Hugging Face to fetch {remote_path}; check the network and rerun (finished files are kept)")
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError:
        die(f"dataset repo {repo_id} not found or not accessible; set MATCHED_FINEWEB_REPO_ID (and HF_TOKEN if private)")
    except Exception as e:  # network and server errors: one line, and a rerun resumes
        die(f"downloading {remote_path} failed ({type(e).__name__}: {e}); rerun to resume")
    return Path(path)


def local_problem(path: Path, size: int | None) -> str | None:
    """Why the local copy of a file is not usable, or None when it is complete."""
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{actual} bytes, manifest lists {size}"
    if path.suffix == ".bin":
        try:
            read_header(path)
        except ShardFormatError as e:
            return e.reason
    return "empty" if actual == 0 else None


class Downloader:
    """Fetches repo files into ``local_dir`` at the same relative paths."""

    def __init__(self, repo_id: str, remote_prefix: str, local_dir: Path):
        self.repo_id, self.remote_prefix, self.local_dir = repo_id, remote_prefix.strip("/"), local_dir
        self.downloaded = self.skipped = 0

    def get(self, rel: str, size: int | None = None) -> bool:
        """Make ``local_dir/rel`` complete; return False if the repo has no such file."""
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            die(f"refusing path {rel!r} from the manifest: it leaves {self.local_dir}")
        dest = self.local_dir / rel
        problem = local_problem(dest, size)
        if problem is None:
            self.skipped += 1
            return True
        if problem != "missing":
            print(f"re-downloading {rel}: {problem}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Staging beside the destination keeps the final rename on one filesystem, hence atomic.
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
        try:
            remote = f"{self.remote_prefix}/{rel}" if self.remote_prefix else rel
            got = fetch(self.repo_id, remote, staging)
            if got is None:
                return False
            actual = got.stat().st_size
            if size is not None and actual != size:
                manifest = self.local_dir / "manifest.json"
                die(f"{rel}: downloaded {actual} bytes but the manifest lists {size}; delete {manifest} and rerun")
            if rel.endswith(".bin"):
                try:
                    read_header(got)
                except ShardFormatError as e:
                    die(f"downloaded {rel} is not a valid shard ({e.reason}); rerun, and report it if it persists")
            os.replace(got, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.downloaded += 1
        print(f"downloaded {rel} ({actual / 1e6:.1f} MB)")
        return True

    def load_manifest(self) -> dict | None:
        path = self.local_dir / "manifest.json"
        if not self.get("manifest.json"):
            print(f"note: {self.repo_id} has no manifest.json; using the conventional file names")
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            die(f"{path} is not valid JSON ({e}); delete it and rerun")
        if not isinstance(manifest, dict):
            die(f"{path} is not a JSON object; delete it and rerun")
        return manifest


def find_entry(manifest: dict | None, section: str, name: str) -> dict | None:
    for entry in (manifest or {}).get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def listed_sizes(entry: dict | None) -> dict[str, int]:
    """Byte sizes an entry lists under "files", keyed by file name."""
    files = (entry or {}).get("files") or {}
    if isinstance(files, dict):
        pairs = files.items()
    else:
        pairs = [(f.get("path") or f.get("name"), f.get("bytes", f.get("size"))) for f in files if isinstance(f, dict)]
    return {Path(str(name)).name: int(size) for name, size in pairs if name and size is not None}


def shard_count(entry: dict | None, sizes: dict[str, int], split: str) -> int | None:
    """How many shards of a split the manifest promises; None when it does not say."""
    stats = (entry or {}).get("stats") or {}
    value = stats.get(f"files_{split}")
    if value is not None:
        return len(value) if isinstance(value, list) else int(value)
    if sizes:
        return sum(name.startswith(f"fineweb_{split}_") for name in sizes)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", required=True, help=f"tokenizer family: one of {', '.join(VARIANTS)}")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"how many train shards to fetch, from the first (default {DEFAULT_TRAIN_SHARDS})")
    p.add_argument("--local-dir", default=str(Path(__file__).resolve().parent),
                   help="where datasets/, tokenizers/ and manifest.json go (default: this script's folder, data/)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # Checked here rather than with argparse choices, whose error spans two lines.
    if args.variant not in VARIANTS:
        die(f"unknown variant {args.variant!r}; use one of {', '.join(VARIANTS)}")
    if args.train_shards < 0:
        die("--train-shards must be 0 or more")
    vocab = int(args.variant.removeprefix("sp"))
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID)
    local_dir = Path(args.local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    dl = Downloader(repo_id, os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", ""), local_dir)

    manifest = dl.load_manifest()
    ds_name = f"fineweb10B_sp{vocab}"
    dataset = find_entry(manifest, "datasets", ds_name)
    if manifest is not None and dataset is None:
        print(f"note: manifest.json does not list {ds_name}; using the conventional file names")
    tokenizer = find_entry(manifest, "tokenizers", (dataset or {}).get("tokenizer_name") or f"fineweb_{vocab}_bpe")
    sizes = listed_sizes(dataset) | listed_sizes(tokenizer)
    n_val, n_train = shard_count(dataset, sizes, "val"), shard_count(dataset, sizes, "train")
    if n_train is not None and args.train_shards > n_train:
        die(f"{repo_id} has only {n_train} train shards for {args.variant}; pass --train-shards {n_train} or fewer")

    # The tokenizer first: it is small and shows at once whether the variant exists.
    if tokenizer is not None:
        tokenizer_files = [tokenizer[k] for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
        optional = set()
    else:
        tokenizer_files = [f"tokenizers/fineweb_{vocab}_bpe.model", f"tokenizers/fineweb_{vocab}_bpe.vocab"]
        optional = {tokenizer_files[1]}  # the .vocab is for people; training needs only the .model

    def get(rel: str) -> bool:
        return dl.get(rel, sizes.get(Path(rel).name))

    def shard(split: str, i: int) -> str:
        return f"datasets/{ds_name}/fineweb_{split}_{i:06d}.bin"

    for rel in tokenizer_files:
        if not get(rel) and rel not in optional:
            die(f"{rel} is not in {repo_id}; check --variant and MATCHED_FINEWEB_REPO_ID")
    i = 0
    # With no count from the manifest, val shards are fetched until the next index is missing.
    while (n_val is None or i < n_val) and get(shard("val", i)):
        i += 1
    if i == 0 or (n_val is not None and i < n_val):
        die(f"{shard('val', i)} is not in {repo_id}; check --variant and MATCHED_FINEWEB_REPO_ID")
    for j in range(args.train_shards):
        if not get(shard("train", j)):
            die(f"{shard('train', j)} is not in {repo_id}: only {j} train shards exist; pass --train-shards {j}")

    print(f"done: {dl.downloaded} downloaded, {dl.skipped} already complete; "
          f"{i} val + {args.train_shards} train shards in {local_dir / 'datasets' / ds_name}")


if __name__ == "__main__":
    main()
