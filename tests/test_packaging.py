"""Packaging: one version, loose runtime pins, an sdist that builds, a build dir that survives
a changed toolchain. The full round trip (isolated wheel, fresh venv) is .ci/package_smoke.sh."""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import vqkern

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setup_module():
    """setup.py's helpers, without running setup() (it only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("vqkern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", req).group(0).lower()


def _source_tree(dest: Path) -> Path:
    """A copy of the tracked files (what a clone has), so builds here never touch the checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vqkern.__version__"}
    # setuptools reads the attribute statically (no torch import at build time): it must be a literal.
    tree = ast.parse((ROOT / "vqkern" / "__init__.py").read_text())
    literal = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
               and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
               and isinstance(node.value, ast.Constant)]
    assert literal == [vqkern.__version__]
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", vqkern.__version__)
    assert "version=" not in (ROOT / "setup.py").read_text()


def test_installed_metadata_matches_this_checkout():
    # Every vqkern on the path: the source tree's own vqkern.egg-info (cwd first on sys.path)
    # has no direct_url.json; the install pip made from this checkout (make test: editable) has.
    sources = []
    for dist in importlib.metadata.distributions(name="vqkern"):
        direct = dist.read_text("direct_url.json")
        url = json.loads(direct)["url"] if direct else ""
        sources.append(url or "an index")
        if url.removeprefix("file://") == str(ROOT):
            assert dist.version == vqkern.__version__
            assert dist.metadata["Name"] == "vqkern"
            return
    pytest.skip(f"no vqkern installed from this checkout (found: {sources or 'none'})")


def test_build_needs_no_torch_and_runtime_pins_are_loose():
    build = [_requirement_name(r) for r in PYPROJECT["build-system"]["requires"]]
    assert sorted(build) == ["cmake", "ninja", "pybind11", "setuptools"]
    deps = PYPROJECT["project"]["dependencies"]
    assert {_requirement_name(r) for r in deps} >= {"torch", "numpy"}
    # An exact or capped torch would make pip swap a machine's own CUDA torch for another wheel.
    torch_req = next(r for r in deps if _requirement_name(r) == "torch")
    assert "==" not in torch_req and "<" not in torch_req and "~=" not in torch_req, torch_req
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        assert "torch" not in {_requirement_name(r) for r in reqs}, f"extra {extra!r} names torch"


def test_extras_cover_the_optional_imports():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) >= {"triton", "train", "test", "bench"}
    assert {_requirement_name(r) for r in extras["train"]} == {"tqdm", "matplotlib", "pillow"}
    assert "triton" in {_requirement_name(r) for r in extras["triton"]}


def test_fresh_build_dir_wipes_a_cache_of_another_toolchain(tmp_path):
    setup = _setup_module()
    build = tmp_path / "cmake"
    setup.fresh_build_dir(build, "toolchain A\n")
    (build / "CMakeCache.txt").write_text("CMAKE_MAKE_PROGRAM:FILEPATH=/gone/ninja\n")
    (build / "obj.o").write_text("built with A")
    setup.fresh_build_dir(build, "toolchain A\n")  # same toolchain: incremental build kept
    assert (build / "obj.o").exists() and (build / "CMakeCache.txt").exists()
    setup.fresh_build_dir(build, "toolchain B\n")  # another one: configured afresh
    assert not (build / "obj.o").exists() and not (build / "CMakeCache.txt").exists()
    assert (build / setup.FINGERPRINT).read_text() == "toolchain B\n"


def test_fresh_build_dir_wipes_a_cache_without_fingerprint(tmp_path):
    setup = _setup_module()
    build = tmp_path / "cmake"
    build.mkdir()
    (build / "CMakeCache.txt").write_text("from a build before the fingerprint\n")
    setup.fresh_build_dir(build, "toolchain A\n")
    assert not (build / "CMakeCache.txt").exists()


def test_fingerprint_names_the_tools_a_cache_binds_to(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake on PATH")
    setup = _setup_module()
    a = setup.toolchain_fingerprint(str(ROOT), cmake, "/a/ninja", None, "/a/pybind11")
    assert a == setup.toolchain_fingerprint(str(ROOT), cmake, "/a/ninja", None, "/a/pybind11")
    for changed in [(str(tmp_path), cmake, "/a/ninja", None, "/a/pybind11"),
                    (str(ROOT), cmake, "/b/ninja", None, "/a/pybind11"),
                    (str(ROOT), cmake, "/a/ninja", "/cuda/bin/nvcc", "/a/pybind11"),
                    (str(ROOT), cmake, "/a/ninja", None, "/b/pybind11")]:
        assert setup.toolchain_fingerprint(*changed) != a, changed


def test_a_skipped_module_left_in_build_lib_is_removed(tmp_path):
    """A wheel packs all of build/lib: a _C from an earlier nvcc build must not ship in a no-CUDA wheel."""
    from setuptools import Distribution

    setup = _setup_module()
    cmd = setup.CMakeBuild(Distribution({"name": "vqkern"}))
    cmd.initialize_options()
    cmd.build_lib = str(tmp_path)
    cmd.extensions = [setup.CMakeExtension("vqkern._cpu", ROOT)]
    (tmp_path / "vqkern").mkdir()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    stale, kept = tmp_path / "vqkern" / f"_C{suffix}", tmp_path / "vqkern" / f"_cpu{suffix}"
    stale.write_bytes(b"\x7fELF")
    kept.write_bytes(b"\x7fELF")
    cmd.drop_stale_modules()
    assert not stale.exists() and kept.exists()


def _sdist(tree: Path, out: Path) -> Path:
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=tree, check=True,
                   capture_output=True, env={**os.environ, "VQKERN_SKIP_CUDA_BUILD": "1"})
    (sdist,) = out.glob("vqkern-*.tar.gz")
    return sdist


def test_sdist_holds_everything_the_build_needs(tmp_path):
    tree = _source_tree(tmp_path / "src")
    (tree / "vqkern" / "_cpu.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stale build")
    sdist = _sdist(tree, tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()
              and p.parts[len(tree.parts)] in ("csrc", "vqkern") and p.suffix != ".so"}
    needed |= {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    assert not needed - names, f"the sdist lacks {sorted(needed - names)}"
    # Every source CMakeLists.txt compiles is in there (a new .cu must be added to both).
    cmake_sources = set(re.findall(r"csrc/[\w/]+\.(?:cpp|cu)", (tree / "CMakeLists.txt").read_text()))
    assert cmake_sources and cmake_sources <= names
    assert not [n for n in names if n.endswith(".so")], "a compiled module leaked into the sdist"


@pytest.mark.slow
def test_wheel_from_the_sdist_holds_the_cpu_extension(tmp_path):
    if shutil.which("cmake") is None or importlib.util.find_spec("pybind11") is None:
        pytest.skip("needs cmake on PATH and pybind11 to build vqkern._cpu")
    sdist = _sdist(_source_tree(tmp_path / "src"), tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheels"), str(unpacked)], check=True, capture_output=True,
                   env={**os.environ, "VQKERN_SKIP_CUDA_BUILD": "1"})
    (wheel,) = (tmp_path / "wheels").glob("vqkern-*.whl")
    assert wheel.name.startswith(f"vqkern-{vqkern.__version__}-")
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
    assert [f for f in files if re.fullmatch(r"vqkern/_cpu\..*\.so", f)], files
    assert not [f for f in files if f.startswith("vqkern/_C.")], "VQKERN_SKIP_CUDA_BUILD=1 still shipped _C"
    package = {str(p.relative_to(unpacked)) for p in (unpacked / "vqkern").rglob("*.py")}
    assert package <= set(files)


@pytest.mark.slow
def test_second_build_after_the_toolchain_is_gone(tmp_path):
    """What an isolated pip build leaves: a cache naming a cmake and ninja that no longer exist."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None or ninja is None or importlib.util.find_spec("pybind11") is None:
        pytest.skip("needs cmake and ninja on PATH and pybind11")
    tree = _source_tree(tmp_path / "src")
    env = {**os.environ, "VQKERN_SKIP_CUDA_BUILD": "1"}
    for i, tools in enumerate(("tools-a", "tools-b")):
        bin_dir = tmp_path / tools
        bin_dir.mkdir()
        (bin_dir / "cmake").symlink_to(cmake)
        (bin_dir / "ninja").symlink_to(ninja)
        run = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=tree, capture_output=True,
                             text=True, env={**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        if i == 0:
            shutil.rmtree(bin_dir)  # like pip's temporary build environment after the build
        else:
            assert "configuring afresh" in run.stderr
    assert list((tree / "build").glob("lib.*/vqkern/_cpu.*.so"))
