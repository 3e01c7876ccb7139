"""A copy of a shared library whose exported `<prefix>name` symbols are exported as plain `name`.

Why: the OpenBLAS on PyPI that works everywhere (`scipy-openblas32`: every x86-64 and arm64 CPU through
DYNAMIC_ARCH, no libgfortran needed) exports `scipy_cblas_sgemm`, `scipy_sgesdd_`, ... so that it never
clashes with another BLAS. MLX's CPU library looks up the plain names (`cblas_sgemm`, `sgesdd_`) at load
time. A copy of the library with the prefix dropped from its dynamic symbol names, loaded into the global
symbol scope before MLX, is what MLX then binds to: the machine code and data are untouched.

How: a symbol's name is an offset into the string table, and `scipy_cblas_sgemm\\0` already contains
`cblas_sgemm\\0` six bytes further on, so renaming only moves each `st_name` forward. The dynamic linker
finds symbols through the GNU hash table, which is keyed by name, so that table is rebuilt in place: one
bucket (no reordering of the symbol table, which relocations index), a chain of the new names' hashes, and
a bloom filter of the same size as before so that lookups of other names are still rejected cheaply. The
new table is never larger than the old one. Only ELF64 little-endian libraries (x86-64, arm64) with a GNU
hash table are handled; anything else raises ValueError and the caller falls back.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_STRTAB, DT_SYMTAB, DT_SYMENT, DT_GNU_HASH = 0, 5, 6, 11, 0x6FFFFEF5
SYM_SIZE = 24  # sizeof(Elf64_Sym)
# Bumped whenever the rewrite changes, so that copies made by an older zrecipe are not reused.
REWRITE_VERSION = 1


def gnu_hash(name: bytes) -> int:
    """The GNU-style ELF symbol hash (dl_new_hash)."""
    h = 5381
    for c in name:
        h = (h * 33 + c) & 0xFFFFFFFF
    return h


class _Elf:
    """Just enough of an ELF64 little-endian file to find and edit its dynamic symbols."""

    def __init__(self, data: bytearray):
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError("not an ELF64 little-endian file")
        self.data = data
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        self.loads, dynamic = [], None
        for i in range(phnum):
            p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from(
                "<IIQQQQ", data, phoff + i * phentsize
            )
            if p_type == PT_LOAD:
                self.loads.append((vaddr, offset, filesz))
            elif p_type == PT_DYNAMIC:
                dynamic = offset
        if dynamic is None:
            raise ValueError("no dynamic section")
        self.dyn: dict[int, int] = {}
        pos = dynamic
        while True:
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            self.dyn.setdefault(tag, value)
            pos += 16
        if DT_GNU_HASH not in self.dyn:
            raise ValueError("no GNU hash table")
        if self.dyn.get(DT_SYMENT, SYM_SIZE) != SYM_SIZE:
            raise ValueError("unexpected symbol entry size")
        self.strtab = self.offset(self.dyn[DT_STRTAB])
        self.symtab = self.offset(self.dyn[DT_SYMTAB])
        self.hash_at = self.offset(self.dyn[DT_GNU_HASH])

    def offset(self, vaddr: int) -> int:
        for start, offset, size in self.loads:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        raise ValueError(f"address {vaddr:#x} is not in a loaded segment")

    def name(self, st_name: int) -> bytes:
        start = self.strtab + st_name
        return bytes(self.data[start : self.data.index(b"\0", start)])

    def hashed_symbols(self) -> tuple[int, int]:
        """(symoffset, number of symbols): the GNU hash table covers symbols symoffset .. n-1."""
        nbuckets, symoffset, maskwords, _shift = struct.unpack_from("<IIII", self.data, self.hash_at)
        buckets_at = self.hash_at + 16 + 8 * maskwords
        buckets = struct.unpack_from(f"<{nbuckets}I", self.data, buckets_at)
        last = max(buckets, default=0)
        if last < symoffset:
            return symoffset, symoffset  # no hashed symbol
        chain_at = buckets_at + 4 * nbuckets
        while not struct.unpack_from("<I", self.data, chain_at + 4 * (last - symoffset))[0] & 1:
            last += 1
        return symoffset, last + 1


def unprefix(data: bytearray, prefix: bytes) -> int:
    """Rename every hashed symbol `prefix + name` to `name` in the library image `data` (in place), unless
    `name` is exported already. Returns the number renamed."""
    elf = _Elf(data)
    first, end = elf.hashed_symbols()
    names = []
    for index in range(first, end):
        (st_name,) = struct.unpack_from("<I", data, elf.symtab + index * SYM_SIZE)
        names.append((index, st_name, elf.name(st_name)))
    present = {name for _, _, name in names}
    renamed = 0
    hashes = []
    for index, st_name, name in names:
        plain = name[len(prefix) :]
        if name.startswith(prefix) and plain and plain not in present:
            struct.pack_into("<I", data, elf.symtab + index * SYM_SIZE, st_name + len(prefix))
            name = plain
            renamed += 1
        hashes.append(gnu_hash(name))
    _, _, maskwords, shift = struct.unpack_from("<IIII", data, elf.hash_at)
    nbuckets_before = struct.unpack_from("<I", data, elf.hash_at)[0]
    size_before = 16 + 8 * maskwords + 4 * nbuckets_before + 4 * len(hashes)
    bloom = [0] * maskwords
    for h in hashes:
        bloom[(h // 64) % maskwords] |= (1 << (h % 64)) | (1 << ((h >> shift) % 64))
    chain = [(h & ~1) | (1 if i == len(hashes) - 1 else 0) for i, h in enumerate(hashes)]
    table = struct.pack(
        f"<IIII{maskwords}QI{len(chain)}I", 1, first, maskwords, shift, *bloom, first if hashes else 0, *chain
    )
    data[elf.hash_at : elf.hash_at + size_before] = table + b"\0" * (size_before - len(table))
    return renamed


def exported(data: bytes | bytearray, name: bytes) -> bool:
    """Whether the library image `data` exports `name` through its GNU hash table (as ld.so looks it up)."""
    elf = _Elf(bytearray(data))
    nbuckets, symoffset, maskwords, shift = struct.unpack_from("<IIII", elf.data, elf.hash_at)
    h = gnu_hash(name)
    (word,) = struct.unpack_from("<Q", elf.data, elf.hash_at + 16 + 8 * ((h // 64) % maskwords))
    if not (word >> (h % 64)) & 1 or not (word >> ((h >> shift) % 64)) & 1:
        return False
    buckets_at = elf.hash_at + 16 + 8 * maskwords
    (index,) = struct.unpack_from("<I", elf.data, buckets_at + 4 * (h % nbuckets))
    if index < symoffset:
        return False
    chain_at = buckets_at + 4 * nbuckets
    while True:
        (value,) = struct.unpack_from("<I", elf.data, chain_at + 4 * (index - symoffset))
        if (value | 1) == (h | 1):
            (st_name,) = struct.unpack_from("<I", elf.data, elf.symtab + index * SYM_SIZE)
            if elf.name(st_name) == name:
                return True
        if value & 1:
            return False
        index += 1


def unprefixed_copy(source: str | os.PathLike[str], folder: str | os.PathLike[str], prefix: str) -> Path:
    """`folder/<name>` = `source` with `prefix` dropped from its exported symbol names (see the module
    docstring). Reused when already there (the name covers the source's path, size, mtime and the rewrite
    version); written atomically otherwise. Raises OSError / ValueError when it cannot be made."""
    import xxhash

    source = Path(source)
    st = source.stat()
    tag = xxhash.xxh64_hexdigest(
        f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{REWRITE_VERSION}".encode()
    )
    target = Path(folder) / f"{source.stem}-unprefixed-{tag}.so"
    try:
        if target.stat().st_size == st.st_size:
            return target
    except FileNotFoundError:
        pass
    data = bytearray(source.read_bytes())
    if not unprefix(data, prefix.encode()):
        raise ValueError(f"{source}: no symbol starts with {prefix!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
