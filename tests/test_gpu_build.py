"""The GPU machine's build: VQKERN_SKIP_CPU_BUILD=1 builds vqkern._C alone.

benchmarks/gpu/session.sh builds with VQKERN_SKIP_CPU_BUILD=1: there the CPU kernels
serve no step, and a failure of their build (they compiled first) cost the whole call.
setup.py then builds only _C and tells CMake so (-DVQKERN_WITH_CPU=OFF), and CMake
defines no _cpu target: no x86-64 check, no OpenMP lookup. The configure below is the
GPU machine's (CUDA on, as there; slow: nvcc's compiler check takes 30 s here) or the
same without CUDA (default run), without compiling.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import Distribution

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("vqkern_setup_gpu", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cmake_calls(setup, monkeypatch, tmp_path, names):
    """The cmake commands setup.py's build runs for the extensions ``names`` (not run)."""
    calls, real_run = [], subprocess.run
    monkeypatch.setattr(setup.subprocess, "run", lambda cmd, **kw: real_run(cmd, **kw) if cmd[1:2] == ["--version"]
                        else calls.append(cmd))
    cmd = setup.CMakeBuild(Distribution({"name": "vqkern"}))
    cmd.initialize_options()
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.extensions = [setup.CMakeExtension(name, ROOT) for name in names]
    for ext in cmd.extensions:
        cmd.build_extension(ext)
    return calls


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or importlib.util.find_spec("pybind11") is None,
                                 reason="needs cmake on PATH and pybind11")


def test_skip_cpu_build_leaves_cpu_out_of_the_extensions(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("VQKERN_SKIP_CPU_BUILD", "1")
    monkeypatch.delenv("VQKERN_SKIP_CUDA_BUILD", raising=False)
    names = [e.name for e in setup.ext_modules()]
    assert "vqkern._cpu" not in names
    assert names == (["vqkern._C"] if setup.find_nvcc() else [])
    monkeypatch.delenv("VQKERN_SKIP_CPU_BUILD")
    if shutil.which("cmake"):
        assert "vqkern._cpu" in [e.name for e in setup.ext_modules()]


@needs_cmake
def test_cmake_is_told_which_extensions_are_built(monkeypatch, tmp_path):
    setup = _setup_module()
    (configure, build), = [_cmake_calls(setup, monkeypatch, tmp_path / "c", ["vqkern._C"])]
    assert "-DVQKERN_WITH_CPU=OFF" in configure and "-DVQKERN_WITH_CUDA=ON" in configure
    assert build[build.index("--target") + 1] == "_C"
    configure, build, configure2, build2 = _cmake_calls(setup, monkeypatch, tmp_path / "both",
                                                        ["vqkern._cpu", "vqkern._C"])
    assert "-DVQKERN_WITH_CPU=ON" in configure and configure == configure2  # one cache, the same options
    assert [build[build.index("--target") + 1], build2[build2.index("--target") + 1]] == ["_cpu", "_C"]


@needs_cmake
@pytest.mark.skipif(shutil.which("ninja") is None, reason="needs ninja on PATH (the targets are listed by it)")
@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["cpu-only", "with-cuda"])
def test_cmake_without_cpu_defines_no_cpu_target(tmp_path, cuda):
    import pybind11

    setup = _setup_module()
    nvcc = setup.find_nvcc() if cuda else None
    if cuda and nvcc is None:
        pytest.skip("no nvcc here (PATH, CUDA_HOME): the CUDA configure needs it")
    args = [shutil.which("cmake"), "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DVQKERN_WITH_CPU=OFF", f"-DVQKERN_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}"]
    if nvcc:
        args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=90a"]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "CUDAARCHS": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    listed = subprocess.run([shutil.which("ninja"), "-C", str(tmp_path), "-t", "targets", "all"],
                            capture_output=True, text=True, check=True).stdout
    targets = {line.split(":")[0].strip() for line in listed.splitlines()}
    assert not [t for t in targets if Path(t).name.startswith("_cpu")], sorted(targets)
    assert not [t for t in targets if "csrc/cpu/" in t]
    if nvcc:
        assert any(Path(t).name.startswith("_C") for t in targets), sorted(targets)
