"""Tar archives with the protocol's traversal rules (spec section 5.11), for CopyIn and CopyOut.

Extraction (:func:`unpack`) reads the archive as a stream, entry by entry, and refuses:

* absolute entry names and names with a ``..`` component (``.`` components are dropped);
* an entry whose path goes *through* a symlink (one already in the destination or created by an
  earlier entry); a symlink *at* the entry's own path is replaced, never followed;
* hard links whose target is not a relative path inside the destination.

Permission bits of files and directories are kept (directories get theirs last, so a read-only
directory does not block its own contents); symlinks are created with their target verbatim;
device nodes are never created and FIFOs are skipped. Extraction stops at the first refused
entry: what was written before it stays.

Packing (:func:`pack`) writes a path under its base name, symlinks as links (never followed, also
when the path itself is a symlink), in chunks of :data:`CHUNK_SIZE` bytes.
"""

import io
import os
import stat
import tarfile

#: Size of the data chunks sent for tar streams (the SDK's size).
CHUNK_SIZE = 256 * 1024


class ArchiveError(Exception):
    """An entry breaks the archive rules, or the archive is corrupt (INVALID_ARGUMENT)."""


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the CopyIn data frames)."""

    def __init__(self, chunks):
        super().__init__()
        self._chunks = iter(chunks)
        self._current = memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._current:
            try:
                self._current = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def safe_relative(name):
    """The entry name as a list of components; raises ArchiveError for absolute or ``..``."""
    if name.startswith("/"):
        raise ArchiveError(
            'tar entry "%s" is absolute: entries must be relative to the destination' % name
        )
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise ArchiveError(
                "tar entry \"%s\" contains '..': entries must stay inside the destination" % name
            )
        parts.append(part)
    return parts


def _check_no_symlink_parents(dest, parts, name):
    """Refuses a write through a symlink in a parent position of ``dest/parts``."""
    cur = dest
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise ArchiveError(
                'tar entry "%s" would be written through the symlink "%s": writes through '
                "symlinks are refused" % (name, os.path.relpath(cur, dest))
            )
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError('tar entry "%s": "%s" is not a directory' % (name, cur))


def _make_parents(dest, parts):
    """Creates the parent directories of ``dest/parts`` (no symlinks: checked before)."""
    cur = dest
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o755)
        except FileExistsError:
            pass


def _remove_non_dir(path):
    """Removes whatever non-directory is at ``path`` (a file or a symlink, never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return st
    os.unlink(path)
    return None


def unpack(chunks, dest):
    """Extracts the tar stream ``chunks`` (an iterator of bytes) into the directory ``dest``.

    Returns ``(entries, bytes)``: entries extracted and regular-file content bytes. Raises
    ArchiveError for a refused entry or a corrupt archive, OSError for I/O failures.
    """
    os.makedirs(dest, exist_ok=True)
    reader = io.BufferedReader(ChunkReader(chunks), buffer_size=CHUNK_SIZE)
    if not reader.peek(1):
        return 0, 0  # no data at all: an empty copy
    entries = 0
    total = 0
    dir_modes = []
    try:
        archive = tarfile.open(fileobj=reader, mode="r|")
    except tarfile.TarError as e:
        raise ArchiveError("reading tar stream: %s" % e) from e
    try:
        while True:
            try:
                member = archive.next()
            except tarfile.TarError as e:
                raise ArchiveError("reading tar entry: %s" % e) from e
            if member is None:
                break
            name = member.name
            parts = safe_relative(name)
            if not parts:
                continue
            if member.islnk():
                safe_relative(member.linkname)
            _check_no_symlink_parents(dest, parts, name)
            path = os.path.join(dest, *parts)
            mode = member.mode & 0o7777
            if member.isdir():
                _make_parents(dest, parts)
                if _remove_non_dir(path) is None:
                    os.mkdir(path, 0o700)
                dir_modes.append((path, mode))
            elif member.isreg():
                _make_parents(dest, parts)
                if _remove_non_dir(path) is not None:
                    raise ArchiveError(
                        'tar entry "%s" is a file where the destination has a directory' % name
                    )
                source = archive.extractfile(member)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while True:
                        block = source.read(CHUNK_SIZE)
                        if not block:
                            break
                        out.write(block)
                    os.fchmod(out.fileno(), mode)
                total += member.size
            elif member.issym():
                _make_parents(dest, parts)
                if _remove_non_dir(path) is not None:
                    raise ArchiveError(
                        'tar entry "%s" is a symlink where the destination has a directory' % name
                    )
                os.symlink(member.linkname, path)
            elif member.islnk():
                _make_parents(dest, parts)
                target = os.path.join(dest, *safe_relative(member.linkname))
                if _remove_non_dir(path) is not None:
                    raise ArchiveError(
                        'tar entry "%s" is a hard link where the destination has a directory' % name
                    )
                os.link(target, path, follow_symlinks=False)
            else:
                # Devices are never created; FIFOs and other kinds are skipped.
                continue
            entries += 1
    except tarfile.TarError as e:
        raise ArchiveError("reading tar stream: %s" % e) from e
    finally:
        # Directory modes last (deepest first), so read-only directories get their contents.
        for path, mode in reversed(dir_modes):
            try:
                os.chmod(path, mode, follow_symlinks=False)
            except (OSError, NotImplementedError):
                try:
                    os.chmod(path, mode)
                except OSError:
                    pass
    return entries, total


class _ChunkWriter(io.RawIOBase):
    """A writable file handing full chunks of CHUNK_SIZE bytes to ``emit``."""

    def __init__(self, emit):
        super().__init__()
        self._emit = emit
        self._buffer = bytearray()

    def writable(self):
        return True

    def write(self, data):
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            self._emit(bytes(self._buffer[:CHUNK_SIZE]))
            del self._buffer[:CHUNK_SIZE]
        return len(data)

    def flush_all(self):
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()


def pack(path, emit):
    """Writes ``path`` as a tar archive holding it under its base name, calling ``emit`` with
    each chunk. Symlinks are stored as links; sockets are skipped."""
    writer = _ChunkWriter(emit)
    name = os.path.basename(path.rstrip("/")) or "."
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        archive.add(path, arcname=name, recursive=True)
    writer.flush_all()
