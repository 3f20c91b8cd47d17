"""Compile-only: the CUTLASS EVT kernel of cutlass_evt_fusion/ builds for sm_90a without a GPU.

nvcc compiles csrc/mlp_down_backward.cu exactly as `pip install ./cutlass_evt_fusion` does (the flags
come from cutlass_evt_fusion/build_config.py, after torch's own nvcc flags), `-c` only, with the CUTLASS
headers of $CUTLASS_PATH or of the `nvidia-cutlass` wheel (requirements-test.txt). The kept PTX must hold
the kernel the op launches: one GemmUniversal entry whose epilogue is the AuxLoad -> phi' -> multiply
tree, Hopper's wgmma and TMA instructions, target sm_90a; where a cuobjdump is at hand (a CUDA toolkit's,
or the one a Triton wheel ships) the SASS too. One translation unit, about 70 s on 2 cores.
The binding (binding.cpp) compiles against torch's headers too. Whether the numbers are right is for
the GPU tests (tests/test_mlp_kernels.py, run by tools/gpu_mlp_check.sh)."""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("cutlass_evt_build_config", ROOT / "cutlass_evt_fusion" / "build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)

NVCC = shutil.which("nvcc")


def _cutlass_includes():
    try:
        return build_config.include_dirs()
    except FileNotFoundError as e:
        pytest.skip(f"no CUTLASS headers ({e})")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_kernel_compiles_for_sm90a(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    includes = _cutlass_includes()
    obj = tmp_path / "mlp_down_backward.o"
    cmd = [NVCC, "-c", str(build_config.KERNEL_SOURCE), "-o", str(obj), *COMMON_NVCC_FLAGS,
           "--compiler-options", "-fPIC", *build_config.NVCC_FLAGS, *[f"-I{d}" for d in includes],
           "--keep", "--keep-dir", str(tmp_path), "-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, "nvcc failed:\n" + proc.stderr[-6000:]
    assert obj.stat().st_size > 0
    ptx = (tmp_path / "mlp_down_backward.ptx").read_text()
    assert ".target sm_90a" in ptx
    entries = re.findall(r"^\.visible \.entry (\S+)\(", ptx, re.M) or re.findall(r"\.entry (\S+)\(", ptx)
    kernels = [e for e in entries if "GemmUniversal" in e]
    assert len(kernels) == 1, entries
    # the epilogue visitor tree, by name: AuxLoad(pre) feeding phi' feeding the multiply by the accumulator
    for part in ("Sm90TreeVisitor", "Sm90AccFetch", "Sm90AuxLoad", "LeakyReluSqGrad", "multiplies",
                 "KernelTmaWarpSpecializedCooperative", "Li128EEENSA_ILi256EEENSA_ILi64E"):
        assert part in kernels[0], part
    assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16" in ptx  # Hopper tensor cores, 64x256 per warpgroup
    assert "cp.async.bulk.tensor" in ptx  # TMA loads and stores
    assert "setmaxnreg" in ptx  # producer/consumer register split of the warp-specialized schedule
    usage = re.search(r"Used (\d+) registers", proc.stdout + proc.stderr)
    assert usage, proc.stderr[-2000:]
    print(f"ptxas: {usage.group(0)}; " + " ".join(re.findall(r"\d+ bytes spill (?:stores|loads)", proc.stdout + proc.stderr)))
    cuobjdump = _cuobjdump()
    if cuobjdump:  # the machine code itself, where a disassembler is at hand (CUDA toolkits, Triton wheels)
        sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
        assert "HGMMA.64x256x16.F32.BF16" in sass  # wgmma, B N-major (tnspB)
        assert "UTMALDG" in sass and "UTMASTG" in sass  # TMA loads (A, B, pre) and the TMA store of dpre
        assert not re.search(r"\b(LDL|STL)\b", sass)  # nothing in local memory
    else:
        print("no cuobjdump here: the SASS checks (HGMMA, UTMALDG/UTMASTG, no local memory) were not made")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")  # Triton wheels ship one; not imported, only located
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = os.path.join(location, "backends", "nvidia", "bin", "cuobjdump")
            if os.access(path, os.X_OK):
                return path
    return None


def _torch_cuda_macros_stub(tmp_path):
    """CPU torch wheels ship c10/cuda headers but not the one CMake generates for CUDA builds; this stub
    holds what it defines (the real one is there on a CUDA machine)."""
    from torch.utils.cpp_extension import include_paths
    if any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in include_paths()):
        return []
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [str(tmp_path / "stub")]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (the binding needs the CUDA runtime headers)")
def test_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    found = [os.path.join(h, "include") for h in homes if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime_api.h"))]
    if not found:
        pytest.skip(f"no CUDA runtime headers (cuda_runtime_api.h) under {', '.join(h for h in homes if h)}")
    cuda_include = found[0]
    includes = include_paths() + _torch_cuda_macros_stub(tmp_path) + [cuda_include, str(build_config.CSRC)]
    cmd = [cxx, "-c", str(build_config.BINDING_SOURCE), "-o", str(tmp_path / "binding.o"), "-std=c++20", "-fPIC", "-O0",
           "-w", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{d}" for d in includes]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "c++ failed:\n" + proc.stderr[-6000:]
