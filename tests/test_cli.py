import subprocess
import sys

from moekit.cli import main


def test_demo_prints_every_router(capsys):
    assert main(["demo", "--tokens", "256", "--d-model", "32", "--d-ff", "64"]) == 0
    text = capsys.readouterr().out
    from moekit import ROUTERS

    for name in ROUTERS:
        assert name in text


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
