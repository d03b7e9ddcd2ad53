"""Bundles libkvxfer.so into the kvxfer package at build time (`pip install ./python`).

The package is pure Python (ctypes), but it needs the library: the build copies it next
to the package, from $KVXFER_LIB if set (a library built elsewhere), else from a
`cargo build --release --lib` of the checkout this directory belongs to. The wheel is
tagged for this platform because it carries a native library.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def library() -> Path:
    if os.environ.get("KVXFER_LIB"):
        return Path(os.environ["KVXFER_LIB"])
    if not (REPO / "Cargo.toml").is_file():
        raise SystemExit("kvxfer: no Cargo.toml next to python/; set KVXFER_LIB to a built libkvxfer.so")
    subprocess.run(["cargo", "build", "--release", "--lib", "--manifest-path", str(REPO / "Cargo.toml")], check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "libkvxfer.so"


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        lib = library()
        if not lib.is_file():
            raise SystemExit(f"kvxfer: {lib} does not exist")
        shutil.copy2(lib, Path(self.build_lib) / "kvxfer" / "libkvxfer.so")


class PlatformDistribution(Distribution):
    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=PlatformDistribution)
