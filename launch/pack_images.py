"""Pack an image folder into one .npz file (and back): how the images travel to a machine without network.

    python launch/pack_images.py SRC pack.npz            # SRC/train/<class>/*, SRC/test/<class>/*
    python launch/pack_images.py --unpack pack.npz DEST

The files' bytes are stored as they are (JPEG stays JPEG), with their relative paths.
"""

import argparse
import os
from pathlib import Path

import numpy as np


def pack(src: Path, dest: Path) -> None:
    names, blobs = [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        names.append(str(path.relative_to(src)))
        blobs.append(path.read_bytes())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(dest, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             names=np.frombuffer("\n".join(names).encode(), np.uint8))
    print(f"packed {len(names)} files from {src} into {dest}")


def unpack(src: Path, dest: Path) -> None:
    pack_file = np.load(src)
    data, offsets = pack_file["data"], pack_file["offsets"]
    names = pack_file["names"].tobytes().decode().split("\n")
    for i, name in enumerate(names):
        out = dest / name
        if ".." in Path(name).parts or os.path.isabs(name):
            raise SystemExit(f"pack_images: refusing unsafe path {name!r} in {src}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data[offsets[i] : offsets[i + 1]].tobytes())
    print(f"unpacked {len(names)} files into {dest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unpack", action="store_true")
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    (unpack if args.unpack else pack)(args.src, args.dest)


if __name__ == "__main__":
    main()
