"""Build the CUTLASS EVT extension (needs nvcc 12+, CUDA torch and CUTLASS headers; runs on sm_90a GPUs):

    pip install --no-build-isolation ./cutlass_evt_fusion

CUTLASS headers come from $CUTLASS_PATH (a tree with include/ and tools/util/include/) or, when it is
unset, from the `nvidia-cutlass` PyPI wheel's bundled sources (pip install nvidia-cutlass==4.2.0.0).
--no-build-isolation: the build imports the torch you run with (its headers and ABI)."""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
os.chdir(HERE)  # setuptools wants source paths relative to the project folder


def _load_build_config():
    spec = importlib.util.spec_from_file_location("_cutlass_evt_build_config", HERE / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        sys.exit(f"cutlass_evt_fusion: needs a CUDA build of torch (this one, {torch.__version__}, is CPU-only)")
    config = _load_build_config()
    try:
        include_dirs = config.include_dirs()
    except FileNotFoundError as e:
        sys.exit(f"cutlass_evt_fusion: {e}")
    print(f"cutlass_evt_fusion: CUTLASS from {config.cutlass_root()[1]}", flush=True)
    extension = CUDAExtension(
        name="cutlass_evt_fusion._C",
        sources=["csrc/binding.cpp", "csrc/mlp_down_backward.cu"],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": config.CXX_FLAGS, "nvcc": config.NVCC_FLAGS},
    )
    setup(
        name="cutlass_evt_fusion",
        version="0.1.0",
        description="Fused MLP backward (GEMM + LeakyReLU(0.5)^2 derivative) as a CUTLASS 3.x SM90 EVT kernel",
        packages=["cutlass_evt_fusion"],
        package_dir={"cutlass_evt_fusion": "."},
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
        python_requires=">=3.9",
        zip_safe=False,
    )


main()
