"""The regular-file members of a tar stream, read block by block: the shard reader's inner loop.

A webdataset shard is a plain POSIX tar (ustar headers, PAX or GNU extensions for long names)
whose members are read once, in order, from a non-seekable stream (a file, an HTTP response, a
command's stdout). The standard library's ``tarfile`` in stream mode (``"r|*"``) does that, but it
builds a ``TarInfo`` per header, keeps a member list that must be cleared by hand, and copies each
member through ``extractfile``; for the ~100 KB members of an ImageNet shard that bookkeeping was
13 % of a decode-only read (profiled: 0.15 s of 1.13 s for 384 JPEGs, 774 headers), the largest
cost after the JPEG decode itself. This reader parses the 512-byte header directly
(POSIX.1-1988 ustar layout, POSIX.1-2001 PAX records, GNU ``L`` long names) and reads each
member's bytes with one ``read``.

It is also stricter than ``tarfile`` in stream mode, which treats a header with a bad checksum or
a header cut short in the middle of the archive as the *end* of the archive and returns quietly:
here both raise ``tarfile.ReadError``, as does a stream that stops without the end-of-archive
blocks every tar writer appends (a shard cut exactly at a member boundary). Compressed tars
(gzip, bzip2, xz) are handed to ``tarfile``, which decompresses them.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# Type flags (POSIX ustar, GNU): what a reader must act on; everything else is skipped.
_REGULAR = (b"0", b"\x00", b"7")  # file, old-style file, contiguous file
_PAX_ENTRY, _PAX_GLOBAL, _GNU_LONG_NAME = b"x", b"g", b"L"


def iter_tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for every regular file of the tar read from ``stream``, in order.

    Directories, links, PAX global headers and other non-file members are skipped. A damaged or
    truncated archive raises ``tarfile.ReadError`` (a ``tarfile.TarError``) after the members
    before the damage; transport errors of ``stream`` (``OSError``) propagate unchanged.
    """
    first = _read_exactly(stream, BLOCK)
    if first.startswith(_COMPRESSED_MAGIC):
        yield from _compressed_members(first, stream)
        return
    yield from _plain_members(first, stream)


def _plain_members(header: bytes, stream) -> Iterator[tuple[str, bytes]]:
    long_name: str | None = None  # set by a GNU 'L' member or a PAX 'path' record
    pax_size: int | None = None
    offset = 0  # of the current header, for the error messages
    while True:
        if len(header) < BLOCK:
            if not header:
                raise tarfile.ReadError(
                    "empty tar" if offset == 0 else
                    f"the tar ends at byte {offset} without its end-of-archive blocks (cut short?)"
                )
            raise tarfile.ReadError(f"the tar ends inside a member header at byte {offset}")
        if header == bytes(BLOCK):
            return  # end-of-archive: the first of the (two) zero blocks is enough
        _check_checksum(header, offset)
        size = pax_size if pax_size is not None else _number(header[124:136], "size", offset)
        kind = header[156:157]
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise tarfile.ReadError(
                f"the tar ends inside the data of a member at byte {offset} ({len(data)} of {size} bytes)"
            )
        _skip(stream, -size % BLOCK)
        if kind == _GNU_LONG_NAME:
            long_name = data.rstrip(b"\x00").decode("utf-8", "surrogateescape")
        elif kind == _PAX_ENTRY:
            records = _pax_records(data, offset)
            long_name = records.get("path", long_name)
            pax_size = int(records["size"]) if "size" in records else None
        elif kind == _PAX_GLOBAL:
            pass  # archive-wide defaults (e.g. a comment); nothing a sample reader uses
        else:
            if kind in _REGULAR:
                yield (long_name if long_name is not None else _ustar_name(header)), data
            long_name, pax_size = None, None  # extension headers apply to the next member only
        offset += BLOCK + size + (-size % BLOCK)
        header = _read_exactly(stream, BLOCK)


def _compressed_members(first: bytes, stream) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=_Replay(first, stream), mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # a streamed tar would otherwise keep every header it has seen


def _check_checksum(header: bytes, offset: int) -> None:
    stored = _number(header[148:156], "checksum", offset)
    # The checksum is the sum of the header's bytes with its own field read as 8 spaces; some
    # old writers summed signed chars, which tarfile also accepts.
    unsigned = 256 + sum(header[:148]) + sum(header[156:])
    if stored != unsigned:
        signed = 256 + sum(b - 256 * (b > 127) for b in header[:148] + header[156:])
        if stored != signed:
            raise tarfile.ReadError(f"damaged tar: bad header checksum at byte {offset}")


def _number(field: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal ASCII, or GNU base-256 when the top bit of its first byte is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"damaged tar: the {what} field at byte {offset} is not a number: {field!r}") from None


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\x00", 1)[0]
    if header[257:262] == b"ustar":  # the ustar prefix field extends the name to 255 bytes
        prefix = header[345:500].split(b"\x00", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """POSIX.1-2001 extended header: records ``"<length> <key>=<value>\\n"``, length counting itself."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\x00":
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
            key, value = data[space + 1:position + length - 1].split(b"=", 1)
        except ValueError:
            raise tarfile.ReadError(f"damaged tar: bad PAX header at byte {offset}") from None
        if length <= 0:
            raise tarfile.ReadError(f"damaged tar: bad PAX header at byte {offset}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _read_exactly(stream, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream (raw streams may return short reads)."""
    data = stream.read(size)
    if data is None:
        data = b""
    if len(data) == size or not data:
        return data
    parts = [data]
    missing = size - len(data)
    while missing:
        more = stream.read(missing)
        if not more:
            break
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)


def _skip(stream, size: int) -> None:
    if size:
        _read_exactly(stream, size)  # padding: a short read here surfaces at the next header


class _Replay(io.RawIOBase):
    """``stream`` with ``head`` (already read from it) put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            count = min(len(buffer), len(self.head))
            buffer[:count] = self.head[:count]
            self.head = self.head[count:]
            return count
        data = _read_exactly(self.stream, len(buffer))
        buffer[:len(data)] = data
        return len(data)
