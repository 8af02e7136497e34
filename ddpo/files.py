"""Files the commands write and hold: atomic writes through temporaries (`written`: the one write rule), appends,
locks, the temporaries a killed run leaves, checks of output paths before any work, and the commands' one-line
errors. A file system's refusal (disk full, read-only, too large, no permission) is a DataError naming the path."""

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
import tempfile

import torch

from ddpo.sources import DataError

TMP = ".tmp-"  # what atomic writers leave behind when killed: .tmp-<name>-<random>, removed by remove_temporaries


def temporary_path(path):
    """A fresh name beside `path` for writing it atomically: .tmp-<name of path>-<random>."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TMP}{name}-{os.urandom(8).hex()}")


def remove_temporaries(directory, names):
    """Remove the leftovers of our killed writers from `directory`: entries named .tmp-<name>-<16 hex digits>
    (temporary_path's names) whose <name> matches the regular expression `names`, and nothing else: another
    .tmp-* entry is not ours to remove. Returns their names."""
    ours = re.compile(rf"{re.escape(TMP)}(?:{names})-[0-9a-f]{{16}}")
    left = sorted(e for e in os.listdir(directory) if ours.fullmatch(e)) if os.path.isdir(directory) else []
    for entry in left:
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return left


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def take_over_if_stale(path, what):
    """Remove the lock at `path` if its pid is no longer running on this host; else DataError naming its holder."""
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        raise DataError(f"{what}: {path} is not a lock file this tool wrote (a link or a directory); remove it if no "
                        "run uses it")
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition(" ")
    except FileNotFoundError:  # released meanwhile
        return
    if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
        print(f"{path}: taking over the lock of pid {pid}, which is no longer running", flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    holder = f"pid {pid} on {host}" if pid.isdigit() and host else "an unknown process"
    raise DataError(f"{what}: in use by {holder} ({path}); wait for that run to end, or remove {path} if no run "
                    "uses it")


@contextlib.contextmanager
def hold_lock(path, what):
    """Hold the lock file `path` around the body: created with O_CREAT | O_EXCL, holding "<pid> <host>", removed when
    the body ends, also on errors. A lock whose pid is no longer running on this host is stale (its run was killed)
    and is taken over with a message; any other lock refuses, a DataError naming `what` (the flag) and the holder."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            take_over_if_stale(path, what)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        yield
    finally:
        os.remove(path)


# a file system's refusals at a path (disk full, a file size limit, a read-only or immutable file, a name too long, a
# link loop, a directory where a file goes): expected, so one line naming the path; any other OSError is a bug
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                      errno.ENAMETOOLONG, errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY}


def refusal(e):
    """The reason (strerror) when an exception is a file system's refusal (FILE_SYSTEM_ERRORS), else None. Writers
    in Rust report one in their own type: safetensors' "... (os error 28)"."""
    if isinstance(e, OSError):
        return e.strerror if e.errno in FILE_SYSTEM_ERRORS else None
    if (code := re.search(r"\(os error (\d+)\)", str(e))) and int(code.group(1)) in FILE_SYSTEM_ERRORS:
        return os.strerror(int(code.group(1)))
    return None


def refused_at(e):
    """A file system's refusal (an OSError) in one line: the path(s) it names, then the reason."""
    return "".join(f"{f}: " for f in (e.filename, e.filename2) if f is not None) + e.strerror


class RecordingWriter:
    """A file's write that remembers the OSError it raised (torch_save)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def torch_save(obj, path):
    """torch.save to a new file, a failed write raising its OSError (disk full, a file size limit): torch's own
    writer reports one as a RuntimeError that names no cause ("unexpected pos 704 vs 598")."""
    with open(path, "xb") as f:
        writer = RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error:
                raise writer.error from None
            raise


@contextlib.contextmanager
def written(path, directory=False):
    """Write `path` atomically: the body fills the temporary path this yields (a new directory when `directory`),
    which is then renamed onto `path`, so readers never see half a file. On any failure the temporary is removed; a
    file system's refusal is a DataError naming `path`. The one rule of every output ddpo writes whole."""
    tmp = temporary_path(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        if directory:
            os.mkdir(tmp)  # the umask's mode, as any new directory (mkdtemp's would be private: 0700)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        if (reason := refusal(e)):
            raise DataError(f"{path}: cannot write it ({reason})") from None
        raise


def atomic_write(path, text):
    """Write text through `written`. The file gets the mode any new file gets (0666 less the umask; the kernel
    applies it), not mkstemp's private 0600."""
    with written(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            f.write(text)


def append(path, text, sync=False):
    """Append text to the file at path (and fsync it when `sync`); a file system's refusal is a DataError naming path
    (a torn last line it leaves is dropped by whoever resumes the file)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except OSError as e:
        if not refusal(e):
            raise
        raise DataError(f"{path}: cannot write it ({e.strerror})") from None


def one_line_errors(run, *args):
    """run(*args), a command's work, with its expected failures as one line (exit status 1): a DataError, and a file
    system's refusal at a path (FILE_SYSTEM_ERRORS). Anything else is a bug and keeps its traceback."""
    try:
        return run(*args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if not refusal(e):
            raise
        sys.exit(f"error: {refused_at(e)}")


def check_not_input(output, source, flag="--output"):
    """Refuse an output that is the input itself (by any path, link or hard link) or a file in the input directory:
    writing it would replace what the user gave us."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    same = os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source)
    if same or out == src or (os.path.isdir(src) and out.startswith(src + os.sep)):
        raise DataError(f"{flag} {output}: is the input {source} or inside it; write the output elsewhere")


def existing_ancestor(path, what):
    """The nearest existing ancestor of path, where the first write goes; a DataError (what: the flag and its value)
    for a broken link or a link loop on the way, through which nothing can be created."""
    directory = os.path.abspath(path)
    while not os.path.exists(directory):
        if os.path.islink(directory):
            raise DataError(f"{what}: {directory} is a broken link or a link loop")
        directory = os.path.dirname(directory)
    return directory


def check_writable(output, flag="--output"):
    """Refuse an output file that cannot be written, before any model loads; creates nothing."""
    if not output:
        raise DataError(f"{flag}: an empty path; name a file")
    if os.path.isdir(output):
        raise DataError(f"{flag} {output}: is a directory")
    directory = existing_ancestor(os.path.dirname(os.path.abspath(output)), f"{flag} {output}")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
        if os.path.exists(output):
            open(output, "ab").close()
    except OSError as e:
        raise DataError(f"{flag} {output}: cannot write there ({e.strerror})") from None


def check_output_dir(path, flag="--output-dir"):
    """DataError unless path is, or can be created as, a writable directory; creates nothing."""
    if not path:
        raise DataError(f"{flag}: an empty path; name a directory (. for this one)")
    existing = existing_ancestor(path, f"{flag} {path}")
    if not os.path.isdir(existing):
        raise DataError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: {existing} is not writable")
