"""Shrink a CUDA shared library for one GPU architecture by zeroing its other fatbin images.

    python benchmarks/gpu/prune_fatbin.py LIB.so [--keep 90]

Why: the `mlx-cuda-13` wheel is 90 MB, over the 64 MiB a device-machine call can carry. 58 MB of its
`libmlx.so` are GPU code for architectures other than the H100/H200's sm_90 (sm_75/80/100/120/121 SASS and
compute_120 PTX). Zeroing those payloads in place keeps every offset and header valid, and the zeros
compress to nothing: the whole wheel's files then pack into 21.6 MB of tar.xz. The CUDA runtime only
loads the image that matches the device, so an sm_90 GPU never reads a zeroed one. Do not use the result
on any other GPU.

Fatbin layout (as read off the file): a 16-byte header (magic 0xBA55ED50, u16 version, u16 header size,
u64 size of the entries), then entries, each a header (u16 kind: 1 PTX, 2 ELF/SASS; u16; u32 header size;
u64 payload size; ...; u32 architecture at offset 28) followed by its payload.
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

MAGIC = struct.pack("<I", 0xBA55ED50)
SASS = 2


def prune(data: bytearray, keep_arch: int) -> tuple[int, int]:
    """Zero every fatbin payload that is not SASS for `keep_arch`; return (bytes zeroed, images kept)."""
    zeroed = kept = 0
    pos = 0
    while (start := data.find(MAGIC, pos)) >= 0:
        _version, header_size, total = struct.unpack_from("<HHQ", data, start + 4)
        if header_size != 16:  # the magic bytes inside something else
            pos = start + 4
            continue
        entry, end = start + header_size, start + header_size + total
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            payload = entry + entry_header
            if kind == SASS and arch == keep_arch:
                kept += 1
            else:
                data[payload : payload + size] = bytes(size)
                zeroed += size
            entry = payload + size
        pos = end
    return zeroed, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("--keep", type=int, default=90, help="SASS architecture to keep (90: H100/H200)")
    args = parser.parse_args()
    data = bytearray(args.library.read_bytes())
    zeroed, kept = prune(data, args.keep)
    if not kept:
        raise SystemExit(f"{args.library}: no sm_{args.keep} image found; nothing written")
    args.library.write_bytes(data)
    print(f"{args.library}: kept {kept} sm_{args.keep} images, zeroed {zeroed / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
