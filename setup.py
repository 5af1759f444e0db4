"""The optional C extension data_prep._native (pyproject.toml holds everything else).

``pip install -e .`` compiles it in place; a machine without a C compiler installs without it and the
Chinese build numbers words in Python instead (slower, same output)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("data_prep._native", ["data_prep/_native.c"], optional=True,
                             extra_compile_args=["-O2"], libraries=["m"])])
