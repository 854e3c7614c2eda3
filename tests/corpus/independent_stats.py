#!/usr/bin/env python3
"""Independent computation of per-image zero / unique / cross-image shared fractions.

Checks nearblock's Rust `index::stats` (see docs/index.md for the definitions) with
nothing in common but the definitions: plain Python file reads and PyPI's `blake3`
(`pip install blake3`).

For each image at block size B (a short last block is a block):
  blocks  = ceil(size / B); zero = blocks whose bytes are all zero; nonzero = rest
  shared  = non-zero blocks whose blake3 also occurs (any offset) in another image
  unique  = nonzero - shared
  zero_pct = 100*zero/blocks, shared_pct / unique_pct = 100*x/nonzero (0 if /0)

Usage: independent_stats.py --block-size 4096 IMAGE... ; prints one JSON object
per image (image = file name without its last extension).
"""
import argparse
import json
import os
import sys

from blake3 import blake3

READ = 64 << 20


def block_names(path, bs):
    """Yields the blake3 digest of each block, or None for an all-zero block."""
    zero = bytes(bs)
    with open(path, "rb", buffering=0) as f:
        while True:
            buf = f.read(READ)
            if not buf:
                break
            mv = memoryview(buf)
            for off in range(0, len(buf), bs):
                blk = mv[off:off + bs]
                if blk == zero[:len(blk)]:
                    yield None
                else:
                    yield blake3(blk).digest()
            if len(buf) % bs:
                # Only the file's last read can end mid-block (READ is a multiple of bs).
                break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    assert READ % a.block_size == 0
    names = [os.path.splitext(os.path.basename(p))[0] for p in a.images]
    lists = [list(block_names(p, a.block_size)) for p in a.images]
    owner = {}  # digest -> image index, or -1 if in several images
    for i, blocks in enumerate(lists):
        for h in blocks:
            if h is None:
                continue
            o = owner.get(h)
            if o is None:
                owner[h] = i
            elif o != i:
                owner[h] = -1
    for name, blocks in zip(names, lists):
        n = len(blocks)
        zero = sum(1 for h in blocks if h is None)
        nonzero = n - zero
        shared = sum(1 for h in blocks if h is not None and owner[h] == -1)
        unique = nonzero - shared
        pct = lambda x, d: 100.0 * x / d if d else 0.0
        print(json.dumps({
            "image": name, "block_size": a.block_size, "blocks": n, "zero": zero,
            "nonzero": nonzero, "shared": shared, "unique": unique,
            "zero_pct": pct(zero, n), "shared_pct": pct(shared, nonzero),
            "unique_pct": pct(unique, nonzero),
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
