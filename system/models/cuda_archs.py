"""Which GPUs a compiled CUDA extension has kernels for, read from the file itself.

A CUDA shared library carries its device code in the ELF section ``.nv_fatbin``: one fatbin
container per translation unit, each holding entries of one kind (cubin: machine code for one
``sm_XY``; PTX: code the driver can compile for ``compute_XY`` or newer) and one architecture.
Only the entry headers are read (not the payloads, which may be compressed), so a 500 MB
flash-attn build is checked in milliseconds, with no ``cuobjdump`` and no CUDA context.

A cubin for sm_XY runs on a device of the same major version X with minor >= Y (sm_80 code runs
on sm_86 and sm_89, not on sm_90); PTX for compute_XY is compiled by the driver for any device
>= XY. Architectures are numbered 10 * major + minor (80, 86, 90, 100, 120).
"""
from __future__ import annotations

import mmap
import struct
from typing import Iterable, Optional

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_CUBIN = 1, 2
_MAGIC_BYTES = struct.pack("<I", FATBIN_MAGIC)

Arch = tuple[str, int]  # ("sm", 80) for a cubin, ("compute", 90) for PTX


def _section(data, name: bytes) -> Optional[tuple[int, int]]:
    """(offset, size) of the ELF64 little-endian section ``name`` in ``data``, or None."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if not shoff or shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        return None

    def header(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        base = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name_off, offset, size

    _, str_off, str_size = header(shstrndx)
    for i in range(shnum):
        name_off, offset, size = header(i)
        if name_off < str_size:
            start = str_off + name_off
            end = data.find(b"\0", start, str_off + str_size)
            if data[start:end] == name and offset + size <= len(data):
                return offset, size
    return None


def fatbin_archs(data, start: int = 0, end: Optional[int] = None) -> set[Arch]:
    """The architectures of every fatbin entry in ``data[start:end]`` (containers found by their
    magic number; a region without one gives the empty set)."""
    end = len(data) if end is None else end
    archs: set[Arch] = set()
    pos = data.find(_MAGIC_BYTES, start, end)
    while pos >= 0 and pos + 16 <= end:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entry, stop = pos + header_size, min(pos + header_size + fat_size, end)
        while entry + 32 <= stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHII", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if kind in (KIND_PTX, KIND_CUBIN) and arch:
                archs.add(("sm" if kind == KIND_CUBIN else "compute", arch))
            if entry_header < 32:  # not an entry header: stop reading this container
                break
            entry += entry_header + payload
        pos = data.find(_MAGIC_BYTES, max(stop, pos + 4), end)
    return archs


def extension_archs(path: str) -> Optional[set[Arch]]:
    """The architectures a compiled extension (``.so``) has device code for; None when the file has
    no ``.nv_fatbin`` section with entries (not a CUDA ELF library, or a layout this reader does
    not know)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        sec = _section(data, b".nv_fatbin")
        if sec is None:
            return None
        archs = fatbin_archs(data, sec[0], sec[0] + sec[1])
    return archs or None


def runs_on(archs: Iterable[Arch], capability: tuple[int, int]) -> bool:
    """True when code for ``archs`` runs on a device of compute ``capability`` (major, minor)."""
    major, minor = capability
    device = 10 * major + minor
    for kind, arch in archs:
        if kind == "sm" and arch // 10 == major and arch % 10 <= minor:
            return True
        if kind == "compute" and arch <= device:
            return True
    return False


def describe(archs: Iterable[Arch]) -> str:
    """'sm_80, sm_90, compute_90' (cubins first, each sorted)."""
    archs = set(archs)
    return ", ".join([f"sm_{a}" for k, a in sorted(archs) if k == "sm"] +
                     [f"compute_{a}" for k, a in sorted(archs) if k == "compute"]) or "no architecture"
