"""Repairing an HDF5 file whose writer died: what ``h5clear -s --increment=0`` does, in place.

An HDF5 file (superblock version 2 or 3, which single-writer/multiple-reader mode needs) records in its superblock
that a writer has it open; a writer killed before closing leaves that mark, and HDF5 then refuses to open the file
except as a SWMR reader ("file is already open for write (may use <h5clear file> to clear file consistency
flags)"). The data that was flushed is intact. Clearing the mark, and raising the stored end-of-file address to the
file's size as ``h5clear --increment`` does (metadata flushed past a stale address stays addressable), makes the
file open as usual again with every flushed row.

Superblock v2/v3 layout (HDF5 file format specification, section II.A): signature (8 bytes), version, size of
offsets, size of lengths, file consistency flags (bit 0: open for write, bit 2: open for SWMR write), then four
addresses (base, superblock extension, end of file, root group object header) and a Jenkins ``lookup3`` checksum of
everything before it. The superblock is at byte 0 or at 512 · 2^k after a user block.
"""

from __future__ import annotations

import os

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def clear_write_flags(path: str | os.PathLike) -> bool:
    """Clear the "open for write" flags of the HDF5 file at ``path`` (only call it once its writer is dead).

    Returns whether the flags were set. A file that is not HDF5 or has an older superblock (which has no such
    flags) is left alone; so is one whose superblock checksum does not match (a damaged file: opening it then
    reports the damage).
    """
    with open(path, "r+b") as file:
        offset = _superblock_offset(file)
        if offset is None:
            return False
        file.seek(offset)
        head = file.read(12)
        version, offset_size, flags = head[8], head[9], head[11]
        if version not in (2, 3) or not flags:
            return False
        size = 12 + 4 * offset_size
        block = bytearray(head + file.read(size - 12))
        if int.from_bytes(file.read(4), "little") != lookup3(bytes(block)):
            return False
        block[11] = 0
        base = int.from_bytes(block[12 : 12 + offset_size], "little")
        end = slice(12 + 2 * offset_size, 12 + 3 * offset_size)
        file_end = os.fstat(file.fileno()).st_size - base
        block[end] = max(int.from_bytes(block[end], "little"), file_end).to_bytes(offset_size, "little")
        file.seek(offset)
        file.write(bytes(block) + lookup3(bytes(block)).to_bytes(4, "little"))
        file.flush()
        os.fsync(file.fileno())
    return True


def _superblock_offset(file) -> int | None:
    size = os.fstat(file.fileno()).st_size
    offset = 0
    while offset + len(SIGNATURE) <= size:
        file.seek(offset)
        if file.read(len(SIGNATURE)) == SIGNATURE:
            return offset
        offset = 512 if offset == 0 else 2 * offset
    return None


def _rotate(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' ``hashlittle`` (lookup3.c, 2006): the checksum of HDF5's metadata (``H5_checksum_lookup3``)."""
    a = b = c = (0xDEADBEEF + len(data) + initval) & _MASK
    words = [int.from_bytes(data[i : i + 4].ljust(4, b"\0"), "little") for i in range(0, len(data), 4)]
    if not words:
        return c
    blocks = (len(data) - 1) // 12  # every full 12-byte block but the last block, which gets the final mix
    for i in range(blocks):
        a, b, c = (a + words[3 * i]) & _MASK, (b + words[3 * i + 1]) & _MASK, (c + words[3 * i + 2]) & _MASK
        a = ((a - c) & _MASK) ^ _rotate(c, 4)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rotate(a, 6)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rotate(b, 8)
        b = (b + a) & _MASK
        a = ((a - c) & _MASK) ^ _rotate(c, 16)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rotate(a, 19)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rotate(b, 4)
        b = (b + a) & _MASK
    last = (words[3 * blocks :] + [0, 0, 0])[:3]
    a, b, c = (a + last[0]) & _MASK, (b + last[1]) & _MASK, (c + last[2]) & _MASK
    c = ((c ^ b) - _rotate(b, 14)) & _MASK
    a = ((a ^ c) - _rotate(c, 11)) & _MASK
    b = ((b ^ a) - _rotate(a, 25)) & _MASK
    c = ((c ^ b) - _rotate(b, 16)) & _MASK
    a = ((a ^ c) - _rotate(c, 4)) & _MASK
    b = ((b ^ a) - _rotate(a, 14)) & _MASK
    c = ((c ^ b) - _rotate(b, 24)) & _MASK
    return c
