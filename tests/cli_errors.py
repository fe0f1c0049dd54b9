"""Shared by the command-line tests: a user error is one line on stderr, `moekit <cmd>: error: ...`,
with no traceback (tests/ is on sys.path through its conftest.py)."""


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("moekit ") and ": error: " in lines[-1], err
    assert "Traceback" not in err
    return lines[-1]
