"""`python -m vqkern.demo`: --backends restricts the run (the packaging smoke test runs the CPU ones)."""
import pytest

from vqkern import demo


def test_demo_runs_only_the_chosen_backends(capsys):
    assert demo.main(["--device", "cpu", "--backends", "torch", "--n", "70", "--k", "33", "--d", "5",
                      "--repeats", "1"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["torch"].split()[1] == "yes"
    for name in ("cuda", "triton", "reference"):
        assert "not in --backends" in rows[name]


@pytest.mark.parametrize("value", ["torch,nope", ",", ""])
def test_demo_rejects_unknown_backends(value, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--backends", value])
    assert exc.value.code == 2
    assert "--backends takes names from" in capsys.readouterr().err
