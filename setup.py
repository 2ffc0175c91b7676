"""Build hook: compiles the native core into ``memascend._native._lib`` through cffi.

All metadata lives in pyproject.toml; this file exists only because cffi's setuptools
integration (``cffi_modules``) has no pyproject form.
"""
from setuptools import setup

setup(cffi_modules=["memascend/_native/build.py:ffibuilder"])
