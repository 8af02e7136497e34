"""The harness of the hostile tables (tests/test_hostile_<command>_safety.py): each row runs a command, through its
main() in this process (`call`) or, where it could hang or needs a launcher (torchrun, bash), in a process of its own
within a time limit (`run`, `shell`), and checks its outcome: the exit code, that an error is one line (no
traceback), and that files it must not touch are byte for byte as they were."""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Outcome:
    code: int | None  # None: still running at the time limit (killed)
    stdout: str
    stderr: str


def children(pid):
    """The processes whose parent is pid (torchrun's ranks)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def call(main, argv):
    """main(argv) in this process, ended as the process would end: its exit code and what it wrote to stderr, with a
    sys.exit message; any other exception (a traceback) escapes to fail the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            print(e.code if isinstance(e.code, str) else "", file=err)
    return Outcome(code or 0, "", err.getvalue())


def launch(command, cwd=None, timeout=120, env=None):
    """`command` in a new process; killed with its children at `timeout` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace") as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in children(proc.pid) + [proc.pid]:
                os.kill(pid, 9)
            stdout, stderr = proc.communicate()
            return Outcome(None, stdout, stderr)
    return Outcome(proc.returncode, stdout, stderr)


def run(argv, **kwargs):
    """The interpreter with argv (["-m", module, ...]); launch's keywords."""
    return launch([sys.executable, *argv], **kwargs)


def shell(argv, substitute, **kwargs):
    """run(argv) from bash, each argument quoted but those named in `substitute` ({argument: bash text}), such as a
    process substitution <(...)."""
    words = [substitute.get(a, shlex.quote(a)) for a in [sys.executable, *argv]]
    return launch(["bash", "-c", " ".join(words)], **kwargs)


def expect_error(outcome, pattern, code=1):
    """Exit code `code` and an error line matching `pattern`, with no traceback on stderr."""
    assert outcome.code is not None, f"still running at the time limit: {outcome.stderr[-2000:]}"
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert outcome.code == code, (outcome.code, outcome.stderr[-3000:])
    assert re.search(pattern, outcome.stderr), outcome.stderr[-3000:]


def expect_success(outcome):
    assert outcome.code == 0, (outcome.code, outcome.stderr[-3000:])


def snapshot(root):
    """Every file under root (links not followed) with its bytes or link target."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found[path] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[path] = f.read()
    return found
