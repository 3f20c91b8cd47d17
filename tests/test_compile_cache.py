"""tools/compile_cache.py: a real torch.compile cache packed into parts, checked and unpacked into another folder,
where a fresh process finds its graphs instead of compiling them; damaged, missing, oversized and unsafe packs
are refused with one line and leave nothing behind. On a GPU machine the graph compiles to Triton kernels, whose
own cache travels in the same folder."""
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT, subprocess_env

TOOL = ROOT / "tools" / "compile_cache.py"

COMPILE_ONCE = """
import torch
from torch._dynamo.utils import counters
@torch.compile(fullgraph=True)
def step(x):
    return torch.nn.functional.gelu(x @ x.T).sum(0) * 3
x = torch.randn(64, 64, device="cuda" if torch.cuda.is_available() else "cpu", requires_grad=True)  # GPU: Triton
step(x).sum().backward()
print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
"""


def compile_with_cache(cache_dir) -> tuple:
    proc = subprocess.run([sys.executable, "-c", COMPILE_ONCE], capture_output=True, text=True, timeout=600,
                          env=subprocess_env({"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    return int(words[words.index("hits") + 1]), int(words[words.index("misses") + 1])


def tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A cache that one compile wrote, packed into parts of 10 KiB (several parts for one small graph)."""
    root = tmp_path_factory.mktemp("compile_cache")
    assert compile_with_cache(root / "first") == (0, 2)  # forward and backward compiled afresh
    if torch.cuda.is_available():  # the Triton kernels went into the folder too, so they travel with it
        assert any((root / "first" / "triton").rglob("*.cubin"))
    result = tool("pack", root / "out", "--cache-dir", root / "first", "--part-mib", 10 / 1024, "--max-parts", 50)
    assert result.returncode == 0, result.stderr
    return root


def test_a_packed_cache_serves_a_fresh_process_in_another_folder(packed):
    manifest = json.loads((packed / "out" / "compile_cache.json").read_text())
    assert len(manifest["parts"]) >= 2 and all(p["bytes"] <= 10 * 1024 for p in manifest["parts"])
    assert manifest["files"] == sum(1 for p in (packed / "first").rglob("*") if p.is_file() and p.suffix != ".lock")
    result = tool("unpack", packed / "out", "--cache-dir", packed / "second")
    assert result.returncode == 0, result.stderr
    assert f"files:{manifest['files']} parts:{len(manifest['parts'])}" in result.stdout
    assert compile_with_cache(packed / "second") == (2, 0)  # both graphs loaded, none compiled


def test_a_damaged_or_missing_part_is_refused_before_anything_is_extracted(packed, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in (packed / "out").iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    part = broken / "compile_cache.tar.xz.001"
    part.write_bytes(part.read_bytes()[:-1] + bytes([part.read_bytes()[-1] ^ 1]))
    result = tool("unpack", broken, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 1 and "compile_cache.tar.xz.001 does not match" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "cache").exists()
    part.unlink()
    result = tool("unpack", broken, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 1 and "compile_cache.tar.xz.001 is missing" in result.stderr
    assert not (tmp_path / "cache").exists()
    result = tool("unpack", tmp_path / "nowhere", "--cache-dir", tmp_path / "cache")
    assert result.returncode == 1 and "no compile_cache.json in" in result.stderr


def test_a_cache_over_its_parts_is_refused_and_leaves_nothing(packed, tmp_path):
    result = tool("pack", tmp_path / "out", "--cache-dir", packed / "first", "--part-mib", 1 / 1024, "--max-parts", 2)
    assert result.returncode == 1 and "packs to more than --max-parts 2" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
    again = tool("pack", packed / "out", "--cache-dir", packed / "first")  # a folder that holds a pack already
    assert again.returncode == 1 and "already holds a packed cache" in again.stderr
    empty = tool("pack", tmp_path / "out2", "--cache-dir", tmp_path / "no_cache")
    assert empty.returncode == 1 and "no compile cache at" in empty.stderr


def test_an_archive_that_leads_out_of_the_cache_folder_is_refused(tmp_path):
    """A pack whose parts match its manifest but whose archive names a path outside the cache: nothing of it is
    written, neither the outside file nor the safe entry before it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("fine.txt", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    data = lzma.compress(buffer.getvalue())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "compile_cache.tar.xz.000").write_bytes(data)
    manifest = dict(format=1, files=2, raw_bytes=4, parts=[
        dict(name="compile_cache.tar.xz.000", bytes=len(data), sha256=hashlib.sha256(data).hexdigest())])
    (tmp_path / "out" / "compile_cache.json").write_text(json.dumps(manifest))
    result = tool("unpack", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert result.returncode == 1 and "cannot be unpacked safely" in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "escaped.txt").exists()
