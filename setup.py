"""vqkern build: the two compiled extensions. The package's metadata (name, version,
dependencies, extras) is in pyproject.toml.

Two extensions, both built by CMake (CMakeLists.txt) with pybind11:

- ``vqkern._cpu`` (csrc/cpu/): the fused CPU search behind the "torch" backend
  on CPU tensors. Built on x86-64 whenever CMake is found;
  ``VQKERN_SKIP_CPU_BUILD=1`` skips it, and the torch backend then runs its
  tiled PyTorch path (slower, same results up to near-ties).
- ``vqkern._C`` (csrc/): the CUDA kernels of the "cuda" backend, built when
  ``nvcc`` is found (on PATH, or under CUDA_HOME / CUDA_PATH / /usr/local/cuda).
  ``VQKERN_SKIP_CUDA_BUILD=1`` skips it (the "cuda" backend then reports itself
  unavailable with the reason). The decision never looks at
  ``torch.cuda.is_available()``: build hosts often have no GPU.

Environment: ``VQKERN_CUDA_ARCHS`` (default ``80;90a``), ``VQKERN_PTXAS_VERBOSE=1``
(register/spill report per kernel), ``MAX_JOBS`` (parallel compile jobs).
With nvcc present, a failing build fails the install loudly.

Every build configures CMake in build/temp.*/cmake; that directory is reused for an
incremental build only when the toolchain it was configured with (cmake, ninja,
compilers, Python, pybind11, nvcc, source directory) is the one in use now, and is
wiped otherwise (an isolated pip build leaves a cache whose cmake and ninja are gone).
"""
from __future__ import annotations

import importlib.machinery
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc() -> str | None:
    """Path of nvcc, or None. PATH first, then the usual CUDA homes."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


FINGERPRINT = "vqkern-toolchain.txt"


def toolchain_fingerprint(source_dir: str, cmake: str, ninja: str | None, nvcc: str | None,
                          pybind11_dir: str) -> str:
    """What a CMake cache binds itself to: the source directory, the cmake, generator,
    compilers and Python of a build.

    pip's isolated builds install cmake and ninja under a temporary directory that is gone
    after the build; a later build that reuses that cache fails at project() (the cached
    CMAKE_MAKE_PROGRAM and CMAKE_COMMAND point nowhere), so a change in any of these means
    configuring from scratch (so does a tree moved or copied elsewhere: CMake refuses a cache
    made for another source directory).
    """
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True)
    lines = [
        f"source={Path(source_dir).resolve()}",
        f"cmake={cmake} {version.stdout.splitlines()[0] if version.stdout else ''}",
        f"ninja={ninja or ''}",
        f"python={sys.executable}",
        f"pybind11={pybind11_dir}",
        f"cc={os.environ.get('CC', '')} cxx={os.environ.get('CXX', '')} "
        f"c++={shutil.which('c++') or ''} cudahostcxx={os.environ.get('CUDAHOSTCXX', '')}",
        f"nvcc={nvcc or ''}",
    ]
    return "\n".join(lines) + "\n"


def fresh_build_dir(build_dir: Path, fingerprint: str) -> None:
    """Keep ``build_dir`` for an incremental build only if it was configured with this
    toolchain; otherwise (another toolchain, or a cache from before the fingerprint) wipe it."""
    stamp = build_dir / FINGERPRINT
    cache = build_dir / "CMakeCache.txt"
    if build_dir.exists():
        same = stamp.is_file() and stamp.read_text() == fingerprint
        if not same and (cache.exists() or stamp.exists()):
            print(f"vqkern: {build_dir} was configured with another toolchain, configuring afresh",
                  file=sys.stderr)
            shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


EXTENSIONS = ("vqkern._cpu", "vqkern._C")


class CMakeBuild(build_ext):
    """Configure and build with CMake; the modules land where setuptools expects them
    (build/lib... for a wheel, copied into the source vqkern/ for an editable install)."""

    def run(self) -> None:
        self.drop_stale_modules()
        super().run()

    def drop_stale_modules(self) -> None:
        """Remove from build/lib the modules this build skips: the wheel packs all of build/lib,
        so a _C left by an earlier build with nvcc would ship in a VQKERN_SKIP_CUDA_BUILD=1 wheel.
        The source tree's vqkern/ is left alone (an in-place build that skips _C keeps the one there)."""
        built = {ext.name for ext in self.extensions}
        for name in EXTENSIONS:
            if name in built:
                continue
            package, module = name.rsplit(".", 1)
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                stale = Path(self.build_lib, *package.split("."), module + suffix)
                if stale.is_file():
                    print(f"vqkern: removing {stale} (left by an earlier build; this one skips {name})",
                          file=sys.stderr)
                    stale.unlink()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        skip = "VQKERN_SKIP_CUDA_BUILD" if ext.name == "vqkern._C" else "VQKERN_SKIP_CPU_BUILD"
        try:
            import pybind11
        except ImportError as exc:  # the toolchain is here, so a missing build tool is an error
            raise RuntimeError(
                f"building {ext.name} needs pybind11 (pip install pybind11), or set {skip}=1") from exc
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(f"building {ext.name} needs cmake on PATH, or set {skip}=1")
        with_cuda = any(e.name == "vqkern._C" for e in self.extensions)
        with_cpu = any(e.name == "vqkern._cpu" for e in self.extensions)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        ninja = shutil.which("ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"
        nvcc = find_nvcc() if with_cuda else None
        fresh_build_dir(build_dir, toolchain_fingerprint(ext.source_dir, cmake, ninja, nvcc,
                                                         pybind11.get_cmake_dir()))
        args = [
            "-G", generator,
            f"-DVQKERN_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVQKERN_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            # Without _cpu (VQKERN_SKIP_CPU_BUILD=1, or not x86-64) CMake defines no _cpu target.
            f"-DVQKERN_WITH_CPU={'ON' if with_cpu else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
            # Passed on every configure so a changed environment wins over the CMake cache.
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('VQKERN_CUDA_ARCHS') or '80;90a'}",
            f"-DVQKERN_PTXAS_VERBOSE={'ON' if _truthy('VQKERN_PTXAS_VERBOSE') else 'OFF'}",
        ]
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", ext.source_dir, "-B", str(build_dir), *args], check=True)
        target = ext.name.rsplit(".", 1)[1]
        subprocess.run([cmake, "--build", str(build_dir), "--target", target, "--parallel", jobs], check=True)


def ext_modules() -> list[Extension]:
    exts = []
    if _truthy("VQKERN_SKIP_CPU_BUILD"):
        print("vqkern: VQKERN_SKIP_CPU_BUILD is set, installing without vqkern._cpu", file=sys.stderr)
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"vqkern: vqkern._cpu is x86-64 code, this is {platform.machine()}: installing without it",
              file=sys.stderr)
    elif shutil.which("cmake") is None:
        print("vqkern: cmake not found, installing without vqkern._cpu", file=sys.stderr)
    else:
        exts.append(CMakeExtension("vqkern._cpu", ROOT))
    if _truthy("VQKERN_SKIP_CUDA_BUILD"):
        print("vqkern: VQKERN_SKIP_CUDA_BUILD is set, installing without vqkern._C", file=sys.stderr)
    elif find_nvcc() is None:
        print("vqkern: nvcc not found (PATH, CUDA_HOME), installing without vqkern._C", file=sys.stderr)
    else:
        exts.append(CMakeExtension("vqkern._C", ROOT))
    return exts


# Name, version, dependencies and packages are in pyproject.toml; this file builds the extensions.
# setuptools runs this file as __main__; tests import it for the helpers above.
if __name__ == "__main__":
    setup(ext_modules=ext_modules(), cmdclass={"build_ext": CMakeBuild})
