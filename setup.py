"""Build script: the C++ prefix trie extension and the kernels/ -> gream_fast.kernels mapping.

Metadata lives in pyproject.toml; this file only says what setuptools cannot declare there.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "gream_fast._trie",
    sources=["csrc/trie.cpp", "csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    packages=find_packages(include=["gream_fast", "gream_fast.*"]) + ["gream_fast.kernels"],
    package_dir={"gream_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
