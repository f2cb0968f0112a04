"""Build of the C++/OpenMP extension ``magicpig._C`` through CMake (see CMakeLists.txt).

Package metadata lives in pyproject.toml; this file only adds what needs code: the CMake
extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension with no sources of its own: CMake builds it from ``sourcedir``."""

    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Configure and build with CMake, putting the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # a build requirement (pyproject.toml)

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        configure = [
            "cmake",
            ext.sourcedir,
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(configure, cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config, "--parallel", jobs], cwd=build_temp, check=True)


setup(
    packages=find_packages(include=["magicpig", "magicpig.*"]),
    # Data read at run time: LongBench's task table, the scheduler's device profiles.
    package_data={"magicpig.eval": ["data/*.json"], "magicpig.perf": ["profiles/*.json"]},
    ext_modules=[CMakeExtension("magicpig._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
