"""tests/requirements.py: a missing server, tool or data set skips the test on a developer's
machine and fails it under CI=true."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.requirements import in_ci, require_binary, require_file, skip_or_fail

pytest_plugins = ["pytester"]

ABSENT_COMMAND = "modelguard-no-such-command-0f3a"


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_under_ci_a_missing_requirement_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match=r"the thing is missing.*CI=true"):
        skip_or_fail("the thing is missing: scripts/setup.sh installs it")
    with pytest.raises(pytest.fail.Exception, match=r"Widget is missing \(.*absent"):
        require_file(tmp_path / "absent", "Widget")
    with pytest.raises(pytest.fail.Exception, match=f"Tool is missing.*{ABSENT_COMMAND}"):
        require_binary(ABSENT_COMMAND, "Tool", "install the tool")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_a_missing_requirement_skips(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="the thing is missing") as skipped:
        skip_or_fail("the thing is missing: scripts/setup.sh installs it")
    assert "CI=true" not in str(skipped.value)
    with pytest.raises(pytest.skip.Exception, match=r"scripts/setup\.sh installs it"):
        require_file(tmp_path / "absent", "Widget")
    with pytest.raises(pytest.skip.Exception, match="install the tool"):
        require_binary(ABSENT_COMMAND, "Tool", "install the tool")


def test_a_present_requirement_passes_either_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    present = tmp_path / "present"
    present.write_bytes(b"")
    for value in ("true", "false"):
        monkeypatch.setenv("CI", value)
        assert require_file(present, "Widget") == present
        assert Path(require_binary("sh", "a shell")).name == "sh"


def test_a_skipped_test_fails_the_run_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through pytest: the outcome of a test whose requirement is missing."""
    pytester.syspathinsert(Path(__file__).resolve().parents[2])
    pytester.makepyfile(
        """
        from tests.requirements import require_binary

        def test_needs_a_tool():
            require_binary("modelguard-no-such-command-0f3a", "Tool")
        """
    )
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=1)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Tool is missing*CI=true*"])
