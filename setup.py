"""Build script: compiles native/*.pyx into agent/_native/ unless DXA_NO_EXTENSIONS=1.

The same switch is honoured at import time by agent/_native/__init__.py, so a
build without extensions and a run with DXA_NO_EXTENSIONS=1 both use the
pure-Python twins.
"""

import os

from setuptools import setup

ext_modules = []
if os.environ.get("DXA_NO_EXTENSIONS", "") not in ("1", "true", "yes"):
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [
            Extension(
                "agent._native._frames",
                ["native/_frames.pyx"],
                extra_compile_args=["-O3"],
            ),
            Extension(
                "agent._native._chunkmap",
                ["native/_chunkmap.pyx"],
                extra_compile_args=["-O3"],
            ),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        build_dir="build/cython",
    )

setup(ext_modules=ext_modules)
