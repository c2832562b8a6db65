"""bench.env.git_commit: rows say which commit measured them, and whether the code was changed."""
import shutil
import subprocess

import pytest

from bench.env import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_rows_appended_under_bench_results_do_not_mark_the_commit_dirty(tmp_path, monkeypatch):
    monkeypatch.delenv("XLT_COMMIT", raising=False)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "c")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("+dirty") and clean != "unknown"
    with open(tmp_path / "bench" / "results" / "rows.jsonl", "a") as f:  # a bench appended its rows
        f.write("{}\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")  # the code changed: the rows must say so
    assert git_commit(tmp_path) == clean + "+dirty"
    monkeypatch.setenv("XLT_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"
