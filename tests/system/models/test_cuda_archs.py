"""The fatbin reader finds the architectures of a CUDA library's device code; the compatibility rule
(cubins within a major version, PTX forward) holds for the cards users have."""
from __future__ import annotations

import struct

import pytest

from system.models.cuda_archs import FATBIN_MAGIC, KIND_CUBIN, KIND_PTX, describe, extension_archs, fatbin_archs, runs_on


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    payload += b"\0" * (-len(payload) % 8)
    # kind, version, header size, padded payload size, (4 bytes), payload size, (8 bytes), arch at 28
    head = struct.pack("<HHIIII", kind, 0x0101, 64, len(payload), 0, len(payload)) + b"\0" * 8 + struct.pack("<I", arch)
    return head + b"\0" * (64 - len(head)) + payload


def _container(*entries: tuple[int, int]) -> bytes:
    body = b"".join(_entry(kind, arch, b"code for %d" % arch * 3) for kind, arch in entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(sections: dict[bytes, bytes]) -> bytes:
    """A minimal ELF64 little-endian file: a null section, the given ones, then .shstrtab."""
    names = b"\0" + b"".join(n + b"\0" for n in [*sections, b".shstrtab"])
    blobs, offset, rows = [], 64, []
    for i, (name, data) in enumerate([*sections.items(), (b".shstrtab", names)]):
        rows.append((names.index(name + b"\0"), offset, len(data)))
        blobs.append(data)
        offset += len(data)
    shoff = offset
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(rows) + 1, len(rows))
    table = b"\0" * 64 + b"".join(struct.pack("<IIQQQQIIQQ", n, 1, 0, 0, off, size, 0, 0, 1, 0) for n, off, size in rows)
    return header + b"".join(blobs) + table


def test_reads_every_container_of_the_fatbin_section(tmp_path):
    fatbin = _container((KIND_CUBIN, 90)) + b"\0" * 8 + _container((KIND_CUBIN, 80), (KIND_PTX, 90))
    # a magic number outside .nv_fatbin (host code) is not read
    lib = tmp_path / "ext.so"
    lib.write_bytes(_elf({b".text": _container((KIND_CUBIN, 75)), b".nv_fatbin": fatbin}))
    archs = extension_archs(str(lib))
    assert archs == {("sm", 80), ("sm", 90), ("compute", 90)}
    assert describe(archs) == "sm_80, sm_90, compute_90"
    assert fatbin_archs(fatbin) == archs


def test_files_without_device_code_are_unknown(tmp_path):
    plain = tmp_path / "plain.so"
    plain.write_bytes(_elf({b".text": b"\x90" * 32}))
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not an ELF file at all, " * 4)
    assert extension_archs(str(plain)) is None and extension_archs(str(text)) is None


@pytest.mark.parametrize("archs,capability,ok", [
    ({("sm", 90)}, (8, 0), False),  # the sm_90-only build on an A100: "no kernel image"
    ({("sm", 90)}, (9, 0), True),
    ({("sm", 80), ("sm", 90)}, (8, 0), True),
    ({("sm", 80)}, (8, 6), True),  # A10 / RTX 30xx run sm_80 code
    ({("sm", 80)}, (8, 9), True),  # L4 / L40S (Ada)
    ({("sm", 80)}, (9, 0), False),  # cubins do not cross a major version
    ({("sm", 86)}, (8, 0), False),
    ({("compute", 80)}, (9, 0), True),  # PTX is compiled forward by the driver
    ({("compute", 90)}, (8, 0), False),
    ({("sm", 80), ("sm", 90)}, (10, 0), False),  # Blackwell needs its own build
])
def test_runs_on(archs, capability, ok):
    assert runs_on(archs, capability) is ok
