from setuptools import find_packages, setup

setup(
    name="refq",
    version="0.1.0",
    description="Reference implementation of low-bit weight quantization for LLaMA-family models (numpy + numba)",
    packages=find_packages(include=["refq", "refq.*", "llama_np", "llama_np.*"]),
    package_data={"refq": ["kernels/cuda/*.cu", "kernels/cuda/*.cuh"]},
    python_requires=">=3.10",         # numba 0.67+
    install_requires=[
        "numpy>=1.24",
        # the versions under which benchmarks/check_kernels_asm.py found every kernel
        # loop vectorised (0.67.0 / 0.49.0 and 0.68.1 / 0.50.0); others may compile
        # the loops to scalar code, 5-20x slower (README, "CPU kernels")
        "numba>=0.67,<0.69",
        "llvmlite>=0.49,<0.51",
        "scipy>=1.10",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "gguf>=0.10",
        "tqdm>=4.60",
        "threadpoolctl>=3.5",    # BLAS on one thread per worker: results independent of thread count
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.5", "dask[distributed]>=2024.1"],
        "cluster": ["dask[distributed]>=2024.1"],   # refq quantize|compare --cluster
        "gpu": ["cupy-cuda12x"],
        "plot": ["matplotlib>=3.5"],        # refq compare's PNG
    },
    entry_points={"console_scripts": ["refq=refq.cli:main"]},
)
