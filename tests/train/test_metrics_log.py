"""metrics.jsonl: rewritten atomically at resume, a torn last line tolerated and reported, any other
damage refused with the file and line named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_train_cli import SMALL
from trainkit import small_run

from moekit.cli import main
from moekit.train.loop import train
from moekit.train.metrics import JsonlLog, read_jsonl


def _log(path, steps):
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s, "pad": "x" * 60}) for s in steps]
    path.write_text("".join(line + "\n" for line in lines))
    return lines


def test_rewrite_at_resume_is_atomic_on_a_full_disk(tmp_path):
    """The rewrite at resume runs into a full disk (a file-size limit makes writes past 500 bytes
    fail, as a full disk would): the old file is left whole and the error names it. (Written in
    place, the file used to be left cut, with a torn last line.)"""
    path = tmp_path / "metrics.jsonl"
    _log(path, range(1, 11))  # ~930 bytes; the kept part (steps 1-8) is ~740 bytes > 500
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))
        from moekit.train.metrics import JsonlLog
        JsonlLog({str(path)!r}, truncate_after_step=8)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "File too large" in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left either
    log = JsonlLog(path, truncate_after_step=8)  # with room, it works
    log.close()
    assert [r["step"] for r in read_jsonl(path)] == list(range(1, 9))


def test_a_killed_rewrite_leaves_the_old_file_and_its_temporary_is_cleaned_up(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(path, range(1, 5))
    before = path.read_bytes()
    # What a kill in the middle of the rewrite leaves: the old file and a part of the new one beside it.
    stale = tmp_path / ".metrics.jsonl.tmp-12345"
    stale.write_text('{"kind": "train", "st')
    JsonlLog(path, truncate_after_step=4).close()
    assert path.read_bytes() == before and not stale.exists()


def test_torn_last_line_is_dropped_and_other_damage_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = _log(path, [1, 2, 3])
    path.write_text("".join(line + "\n" for line in lines[:2]) + lines[2][:25])  # cut mid-record
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]  # what the report and compare's watcher read
    log = JsonlLog(path, truncate_after_step=5)
    log.write({"kind": "train", "step": 3})
    log.close()
    assert log.torn_line == lines[2][:25].encode()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    # A bad line that is not the last (or a last line that did end with a newline) is damage.
    path.write_text(lines[0] + "\n" + lines[1][:25] + "\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a valid record"):
        read_jsonl(path)
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a valid record"):
        JsonlLog(path, truncate_after_step=5)
    path.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: .*not an object"):
        read_jsonl(path)
    path.write_bytes(b'{"kind": "event", "step": 1, "message": "\xff"}\n')  # not UTF-8
    with pytest.raises(ValueError, match=rf"{path}, line 1"):
        read_jsonl(path)


def test_resume_over_a_torn_log_reports_it(tmp_path, small_data):
    """What a kill mid-write (or an interrupted in-place rewrite) leaves, a cut last line, no longer
    stops every later --resume with an unnamed JSON error: the torn line is dropped, with a warning
    naming the file and an entry in run.json, and the log comes out as the uninterrupted run's."""
    cfg = small_run("schedule.steps=4", "checkpoint.every=2", "eval.every=0")
    out = tmp_path / "run"
    train(cfg, out, data=small_data)
    full = (out / "metrics.jsonl").read_text()
    lines = full.splitlines()
    cut = [i for i, line in enumerate(lines) if json.loads(line)["step"] == 3][0]
    # Killed while writing the step-3 record: the newest checkpoint is step 2's.
    (out / "metrics.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:40])
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    with pytest.warns(RuntimeWarning, match=rf"{out / 'metrics.jsonl'}: dropped its last line"):
        train(cfg, out, data=small_data, resume=True)
    resumes = json.loads((out / "run.json").read_text())["resumes"]
    assert resumes[-1]["step"] == 2 and resumes[-1]["dropped_torn_line"] == lines[cut][:40]
    strip = ("time", "cpu_time", "elapsed", "tokens_per_s")
    expected = [{k: v for k, v in json.loads(line).items() if k not in strip} for line in lines]
    assert [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(out / "metrics.jsonl")] == expected


def test_resume_over_a_damaged_log_names_the_file_and_line(tmp_path, capsys):
    out = tmp_path / "run"
    sets = SMALL + ["schedule.steps=2", "schedule.warmup_steps=1", "checkpoint.every=1", "eval.every=0",
                    "logging.every=1"]
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", *sets]) == 0
    text = (out / "metrics.jsonl").read_text().splitlines()
    text[1] = text[1][:30]  # damaged, and not the last line
    (out / "metrics.jsonl").write_text("\n".join(text) + "\n")
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--out", str(out), "--resume", "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'}, line 2: not a valid record" in err and len(err.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text().splitlines() == text  # left as it was, for the user to repair
