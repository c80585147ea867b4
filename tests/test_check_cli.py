"""``python -m vqkern.check``: the table, the JSON and the exit status, in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from vqkern.check import cli

ROOT = Path(__file__).resolve().parents[1]
# The torch backend, fp32, both metrics: two rows, about 3 s (the interpreter would take a minute).
ARGS = ["--backend", "torch", "--dtype", "fp32", "--cases", "2"]


def _run(code_or_args, tmp_path, script=False):
    env = dict(os.environ)
    env.pop("VQKERN_SELFCHECK", None)
    cmd = [sys.executable, "-c", code_or_args] if script else [sys.executable, "-m", "vqkern.check", *code_or_args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_check_passes_on_this_machine(tmp_path):
    out = _run(ARGS + ["--json", str(tmp_path / "check.json")], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    for column in ("self-check", "cases", "failed", "rank excess", "grad ratio", "time s"):
        assert column in lines[header]
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [(r[0], r[1], r[-9], r[-8], r[-7], r[-6], r[-5], r[-4]) for r in rows] == [
        ("torch", "cpu", "fp32", "fp32", "l2", "pass", "2", "0"),
        ("torch", "cpu", "fp32", "fp32", "cosine", "pass", "2", "0")]
    assert lines[-1].startswith("vqkern.check: PASS: 2 rows, 4 fuzz cases")
    record = json.loads((tmp_path / "check.json").read_text())
    assert record["verdict"] == "pass" and record["command"].startswith("python -m vqkern.check --backend torch")
    versions = record["versions"]
    for field in ("vqkern", "git_commit", "torch", "triton", "cuda", "driver", "gpus", "cpu_model", "cpu_kernel"):
        assert field in versions
    assert versions["cpu_model"] and versions["torch"].startswith("2.")
    if (ROOT / ".git").exists():
        assert versions["git_commit"] and len(versions["git_commit"].split("-")[0]) == 40
    assert [(r["metric"], r["selfcheck"], r["cases"], r["failed_cases"]) for r in record["rows"]] == [
        ("l2", "pass", 2, 0), ("cosine", "pass", 2, 0)]
    assert all(0 <= r["worst_rank_excess"] <= 1e-5 and 0 <= r["worst_grad_ratio"] <= 2 for r in record["rows"])


def test_a_wrong_backend_fails_the_check(tmp_path):
    # The torch backend's search returns each row's second-nearest code: the self-check and
    # the fuzz cases both see it, the exit status is 1, the JSON says what failed.
    script = textwrap.dedent(f"""
        import sys
        import torch
        from vqkern.backends import torch_
        from vqkern.check import cli
        real = torch_.search
        def search(z, codebook, indices, distances, quantized):
            real(z, codebook, indices, distances, quantized)
            if codebook.shape[0] > 1:
                d = ((z.double()[:, None] - codebook.double()[None]) ** 2).sum(-1)
                idx = d.argsort(dim=1, stable=True)[:, 1]
                indices.copy_(idx)
                distances.copy_(((z.float() - codebook[idx].float()) ** 2).sum(1))
                quantized.copy_(codebook[idx].to(quantized.dtype))
        torch_.search = search
        sys.exit(cli.main({ARGS + ["--metric", "l2", "--json", str(tmp_path / "check.json")]!r}))
    """)
    out = _run(script, tmp_path, script=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "vqkern.check: FAIL: 1 of 1 rows failed (torch on cpu)" in out.stdout
    assert "self-check: case 'row and code tiles'" in out.stdout and "search rank" in out.stdout
    record = json.loads((tmp_path / "check.json").read_text())
    row, = record["rows"]
    assert record["verdict"] == "fail" and row["selfcheck"] == "FAIL" and row["failed_cases"] >= 1
    assert any(f["check"] == "rank" for f in row["failures"])


@pytest.mark.parametrize("args", [["--cases", "-1"], ["--backend", "nope"], ["--dtype", "fp64"]])
def test_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2 and "python -m vqkern.check" in capsys.readouterr().err


def test_console_script_is_declared():
    # pip writes the vqkern-check script from this entry point (pyproject.toml).
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("vqkern-check") == "vqkern.check.cli:main", \
        "reinstall vqkern (pip install -e .): pyproject.toml declares the vqkern-check script"
    assert Path(sys.executable).with_name("vqkern-check").exists()
