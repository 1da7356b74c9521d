"""Files written whole: a reader (another rank, a resumed run, a user's script) never sees half of one.

And durable: a file is flushed to disk (``fsync``) before it is renamed into place, and the folder after (the
rename itself), so a power loss or a kernel crash right after a write leaves the old file or the whole new one,
never a renamed but empty one (the page cache holds a rename and a file's bytes for seconds before writing them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

DISK_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # writes that fail whatever the code does


def disk_refused(e: BaseException) -> bool:
    """Whether ``e`` is a write the disk refused (full, over quota, read-only, past the file-size limit:
    :data:`DISK_REFUSED`), which a launcher says in one line rather than a traceback."""
    return isinstance(e, OSError) and e.errno in DISK_REFUSED


def fsync_path(path) -> None:
    """Flush ``path`` to disk: a file's bytes, or a folder's entries (the files made and renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder) -> None:
    """:func:`fsync_path` of every file and folder under ``folder``, and of ``folder``: before it is renamed into
    place, so what the new name points to is on disk. Symbolic links are left alone (what they point to is not in
    the folder, and may not exist)."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


def write_text_atomic(path, text) -> Path:
    """``text`` (a str, or an iterable of them, written as they come) into ``path`` (its folder made) through a
    temporary file beside it, flushed to disk and renamed over it (``os.replace``), then the folder flushed: a crash
    at any point leaves the old file or the new one.
    The temporary file is this write's own (``<name>.<random>.tmp``: two processes writing one file at once do not
    write into one), removed where the write fails (a full disk: its OSError names ``path``), and given the mode a
    plain ``open`` gives (0666 less the umask; ``mkstemp`` makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(text) if isinstance(text, str) else f.writelines(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write's or a flush's error names no file
            e.filename = str(path)
        raise
    fsync_path(path.parent)
    return path


def dangling_link(folder) -> Optional[str]:
    """Where ``folder`` or a folder above it is a symbolic link to nothing (``runs -> /scratch/me/runs`` after the
    scratch space was purged), the words saying so: the OS's reason for not making a folder there is "File exists"."""
    for p in (Path(folder), *Path(folder).parents):
        if p.is_symlink() and not p.exists():
            return f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
    return None


def folder_problem(folder) -> Optional[str]:
    """Why ``folder`` cannot be made or written in (the OS's reason), or None: found by making it (and the missing
    folders above it), then removing what was made, so a command refused for another reason afterwards leaves
    nothing; an existing folder must let this process write in it."""
    folder = Path(folder)
    if link := dangling_link(folder):
        return link
    # looked at again where what was seen is gone: another process trying the same folder (each rank of a launch
    # checks its --out) removed what it had made to try it
    for _ in range(3):
        made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first, as they are removed
        there = folder.parents[len(made) - 1] if made else folder  # the nearest that exists
        if there.is_dir():
            break
        if there.exists():  # the OS says "File exists" or "Not a directory"
            return f"{there} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        for p in made:
            with contextlib.suppress(OSError):  # another process's files in it since: left as they are
                p.rmdir()
    if not made and not os.access(folder, os.W_OK | os.X_OK) and folder.exists():  # (or removed since, as above)
        return "not writable (its permissions, or a read-only file system)"
    return None


def out_problem(out, flag: str = "--out") -> Optional[str]:
    """A launcher's one-line refusal of an output folder ``out`` (given as ``flag``) that cannot be made or written
    (:func:`folder_problem`'s reason), or None."""
    problem = folder_problem(out)
    return f"{flag} {out} cannot be created or written: {problem}; choose another {flag}" if problem else None


def _umask() -> int:
    try:  # Linux: read without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path, metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file``, with the permissions any other file gets (0666 less the umask): the
    library creates its files 0600, so an adapter or a feature cache shared with colleagues could not be read
    by them. A write the OS refuses (a full disk, a quota, a file-size limit) is its OSError naming ``path``.
    The metadata is written in key order (:func:`_sort_metadata`): the same tensors give the same bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
        _sort_metadata(path, metadata)
    except Exception as e:  # SafetensorError("... I/O error: File too large (os error 27)"): the file unnamed
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
    os.chmod(path, 0o666 & ~_umask())
    return path


def _sort_metadata(path: Path, metadata: Optional[dict]) -> None:
    """Rewrite the file's ``__metadata__`` (the header's first entry) with its keys sorted, in place: safetensors
    writes them in its hash map's order, which changes from one save to the next, so two runs that trained the same
    weights wrote adapters of other bytes (another sha256; the adapter's format and step: 1 run in 2). The same
    keys and values in another order have the same length; a header that does not read so is left as written."""
    if not metadata or len(metadata) < 2:
        return
    ordered = json.dumps({"__metadata__": dict(sorted(metadata.items()))}, separators=(",", ":"),
                         ensure_ascii=False).encode()[:-1]  # '{"__metadata__":{...}' without the closing brace
    with open(path, "r+b") as f:
        written = f.read(8 + len(ordered))[8:]
        try:
            same = json.loads(written + b"}") == json.loads(ordered + b"}")
        except ValueError:
            return
        if same:
            f.seek(8)
            f.write(ordered)


def cwd_note(path) -> str:
    """For a relative ``path`` that is not there, where it was read from: a run's config keeps its paths as given, so
    evaluate.py, predict.py or a resume started in another folder read them there ("" for an absolute path). A
    '~' is not expanded here: the config's path settings have it expanded when loaded (config.HOME_PATHS)."""
    if Path(path).is_absolute():
        return ""
    return (f" (read from the working directory {os.getcwd()}: run from the folder it is relative to, or give its "
            "absolute path)")


def launcher_path(name: str) -> str:
    """How a command printed for the user to type names ``launchers/<name>``: so, from the checkout (the README's
    commands), else by its absolute path (launched from another folder, ``launchers/<name>`` is not there there);
    so too where no checkout holds the package (an installed wheel)."""
    there = Path(__file__).resolve().parent.parent / "launchers" / name
    return str(there) if there.is_file() and Path("launchers", name).resolve() != there else f"launchers/{name}"


def hold_lock(path, holder: str):
    """An exclusive lock on the file ``path`` (created; held while the returned file is open or the process lives),
    ``holder`` (who holds it: a pid, a time) written in it: (the open file, None), or (None, what the process
    holding it wrote) where another holds it. OSError where the file cannot be opened. A holder may remove the file
    as it ends (evaluate.py's --out lock): a lock taken on the file it removed is taken again on the one there now."""
    import fcntl

    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held_by = _holder(f)
            f.close()
            return None, held_by
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(holder + "\n")
    f.flush()
    return f, None


def lock_holder(path) -> Optional[str]:
    """Who holds the lock :func:`hold_lock` takes on the file ``path`` (what it wrote), or None where no process
    does or there is no such file. It only looks: a shared lock for an instant, which other lookers share; the file
    is not made."""
    import fcntl

    try:
        f = open(path)
    except OSError:  # no lock file, or one this process cannot read: taking the lock says which
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(f)
    return None


def _holder(f) -> str:
    """What the holder of the lock on the open file ``f`` wrote in it."""
    f.seek(0)
    return f.read().strip() or "another process"
