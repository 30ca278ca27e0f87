"""Installs fastface; the top-level kernels/ folder is installed as fastface.kernels."""
from setuptools import setup

setup(
    name="fastface",
    version="0.1.0",
    description="Self-supervised monocular 3D face reconstruction with hand-written CPU and GPU kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["fastface", "fastface.ops", "fastface.model", "fastface.nn", "fastface.io", "fastface.kernels",
              "fastface.data"],
    package_dir={"fastface.kernels": "kernels"},
    package_data={"fastface.kernels": ["*.cu", "*.cuh"],
                  "fastface.io": ["cascades/*.xml"]},
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "numba>=0.59",
        "h5py>=3.9",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
    ],
    extras_require={
        "gpu": ["cupy-cuda13x>=13; platform_system=='Linux'"],
        "gpu-cuda12": ["cupy-cuda12x>=13"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6"],
        "distributed": ["dask[distributed]>=2024.1"],
    },
    entry_points={"console_scripts": ["fastface=fastface.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
