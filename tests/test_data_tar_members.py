"""The block-level tar reader against the standard library's ``tarfile`` on real tar files written
in every format a shard writer may produce, and its errors on damaged ones."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from scale_ssl.data.tar_members import iter_tar_members


def _tar_bytes(members, fmt=tarfile.PAX_FORMAT, compression="", global_pax=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w", format=fmt,
                      pax_headers=global_pax or {}) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000.25  # a fractional mtime makes the PAX writer add a record per member
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _members() -> list[tuple[str, bytes, str]]:
    rng = random.Random(3)
    long_dir = "class_" + "x" * 120  # > 100 bytes: needs the ustar prefix, a GNU 'L' or a PAX path
    return [
        ("train", b"", "dir"),
        ("train/n01440764_10026.jpg", rng.randbytes(1000), "file"),
        ("train/n01440764_10026.cls", b"0", "file"),
        ("train/empty.txt", b"", "file"),
        ("train/link.jpg", b"", "symlink"),
        (f"{long_dir}/sample_{'y' * 90}.jpg", rng.randbytes(512), "file"),  # exactly one block
        (f"{long_dir}/sample_{'y' * 90}.cls", b"7", "file"),
        (f"{long_dir}/short_name.jpg", rng.randbytes(3), "file"),  # ustar: prefix + name
        ("train/caf\u00e9_1.jpg", rng.randbytes(70_001), "file"),  # non-ASCII name: a PAX path record
    ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_every_tar_format_reads_as_tarfile_reads_it(fmt):
    members = _members()
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot store non-ASCII names or a 125-byte file name
        members = [m for m in members if m[0].isascii() and len(m[0].rsplit("/", 1)[-1]) < 100]
    raw = _tar_bytes(members, fmt=fmt, global_pax={"comment": "shard 7"} if fmt == tarfile.PAX_FORMAT else None)
    expected = _reference(raw)
    assert len(expected) == sum(kind == "file" for _, _, kind in members)
    assert list(iter_tar_members(io.BytesIO(raw))) == expected


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_tars_are_decompressed(compression):
    raw = _tar_bytes(_members(), compression=compression)
    assert list(iter_tar_members(io.BytesIO(raw))) == _reference(raw)


class _Trickle(io.RawIOBase):
    """A raw stream (like a socket or a pipe) that returns at most a few bytes per read."""

    def __init__(self, data: bytes, seed: int):
        self.data, self.position, self.rng = data, 0, random.Random(seed)

    def readable(self):
        return True

    def readinto(self, buffer):
        count = min(len(buffer), self.rng.randint(1, 700), len(self.data) - self.position)
        buffer[:count] = self.data[self.position:self.position + count]
        self.position += count
        return count


def test_short_reads_from_a_raw_stream_give_the_same_members():
    raw = _tar_bytes(_members())
    for seed in range(5):
        assert list(iter_tar_members(_Trickle(raw, seed))) == _reference(raw)


def _offsets_of_headers(raw: bytes) -> list[int]:
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for member in tar:
            offsets.append(member.offset)
    return offsets


def test_a_bad_header_checksum_in_the_middle_is_an_error_not_an_early_end():
    raw = bytearray(_tar_bytes(_members(), fmt=tarfile.GNU_FORMAT))
    third = _offsets_of_headers(bytes(raw))[2]
    raw[third + 10] ^= 0x01  # one flipped bit in a header's name
    # tarfile in stream mode stops quietly there, as if the archive had ended:
    with tarfile.open(fileobj=io.BytesIO(bytes(raw)), mode="r|") as tar:
        quietly = [m.name for m in tar if m.isreg()]
    assert len(quietly) == 1
    members = iter_tar_members(io.BytesIO(bytes(raw)))
    assert next(members)[0] == "train/n01440764_10026.jpg"
    with pytest.raises(tarfile.ReadError, match=f"bad header checksum at byte {third}"):
        next(members)


@pytest.mark.parametrize("cut", ["in a header", "in member data", "at a member boundary", "empty"])
def test_a_truncated_tar_raises_after_the_members_before_the_cut(cut):
    raw = _tar_bytes(_members(), fmt=tarfile.GNU_FORMAT)
    second, third = _offsets_of_headers(raw)[1:3]
    end = {"in a header": third + 100, "in member data": second + 512 + 10, "at a member boundary": third,
           "empty": 0}[cut]
    read = []
    with pytest.raises(tarfile.ReadError, match="empty tar|ends"):
        for name, _ in iter_tar_members(io.BytesIO(raw[:end])):
            read.append(name)
    assert read == ([] if cut in ("empty", "in member data") else ["train/n01440764_10026.jpg"])


def test_a_corrupt_size_field_is_an_error_naming_the_field():
    raw = bytearray(_tar_bytes(_members()[:2], fmt=tarfile.USTAR_FORMAT))
    header = _offsets_of_headers(bytes(raw))[1]
    raw[header + 124:header + 136] = b"12z4567\x00\x00\x00\x00\x00"
    # keep the checksum right, so the size field itself is what is wrong
    raw[header + 148:header + 156] = b" " * 8
    raw[header + 148:header + 156] = b"%06o\x00 " % sum(raw[header:header + 512])
    with pytest.raises(tarfile.ReadError, match="size field at byte 512 is not a number"):
        list(iter_tar_members(io.BytesIO(bytes(raw))))
