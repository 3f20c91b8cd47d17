"""How the extension is compiled: CUTLASS include folders and nvcc flags, shared by setup.py and the
compile-only test (tests/test_cutlass_evt_fusion.py), so the test compiles exactly what pip builds.

Plain standard library: setup.py loads this file by path, before anything is installed."""
import importlib.util
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
KERNEL_SOURCE = CSRC / "mlp_down_backward.cu"
BINDING_SOURCE = CSRC / "binding.cpp"

# sm_90a, not sm_90: wgmma and setmaxnreg exist only on the "a" target, and the -gencode form (rather
# than -arch=sm_90a) builds for that target alone.
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]
NVCC_FLAGS = ARCH_FLAGS + [
    "-O3",
    "-std=c++17",
    "-DNDEBUG",
    "--expt-relaxed-constexpr",
    # torch's extension build defines these to keep its own half/bf16 operators unambiguous; CUTLASS's
    # numeric types want the CUDA operators back.
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
]
# No -std for the binding: torch adds the standard its own headers need (C++17 or C++20 by version).
CXX_FLAGS = ["-O3"]


def _wheel_cutlass_root():
    """The CUTLASS source tree bundled in the `nvidia-cutlass` PyPI wheel (package cutlass_library),
    found without importing it (its __init__ pulls in cuda-python)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "source"
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return root
    return None


def cutlass_root():
    """(root, where) of a CUTLASS tree holding include/ and tools/util/include/: $CUTLASS_PATH first,
    else the nvidia-cutlass wheel's bundled sources; (None, why) when neither has the headers."""
    env = os.environ.get("CUTLASS_PATH")
    if env:
        root = Path(env)
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return root, f"CUTLASS_PATH={env}"
        return None, f"CUTLASS_PATH={env} has no include/cutlass/cutlass.h"
    root = _wheel_cutlass_root()
    if root is not None:
        return root, f"nvidia-cutlass wheel ({root})"
    return None, "no CUTLASS headers: set CUTLASS_PATH or pip install nvidia-cutlass==4.2.0.0"


def include_dirs():
    """The include folders for CUTLASS; raises FileNotFoundError with the reason when there are none."""
    root, where = cutlass_root()
    if root is None:
        raise FileNotFoundError(where)
    dirs = [root / "include", root / "tools" / "util" / "include"]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"{where}: missing {', '.join(missing)}")
    return [str(d) for d in dirs] + [str(CSRC)]
