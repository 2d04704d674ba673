#!/usr/bin/env python3
"""The source generations of the power-cut harness (scripts/powercut),
byte for byte the same on every machine: the guest syncs them while the
log is recorded, the host compares replicas with them when it replays.

    powercut-gen.py DIR        writes DIR/gen1.img .. DIR/gen3.img

Version "v1" (recorded with every log; change the name if the content
changes, or old fixtures stop matching):
  gen1  2 MiB, every 4 KiB block 64 random bytes repeated (distinct per
        block, yet a log of it compresses well), every 16th block zeros
  gen2  gen1 with 40 blocks rewritten: a small, journaled delta
  gen3  gen2 with 300 blocks rewritten: a delta larger than the
        --journal-max the harness gives it, applied in place
"""
import os
import random
import sys

VERSION = "v1"
SIZE = 2 << 20
BLOCK = 4096


def block(rnd):
    return rnd.randbytes(64) * (BLOCK // 64)


def main(out):
    rnd = random.Random(1)
    img = bytearray()
    for i in range(SIZE // BLOCK):
        img += bytes(BLOCK) if i % 16 == 0 else block(rnd)
    gens = [bytes(img)]
    for seed, count in ((2, 40), (3, 300)):
        rnd = random.Random(seed)
        for b in rnd.sample(range(SIZE // BLOCK), count):
            img[b * BLOCK:(b + 1) * BLOCK] = block(rnd)
        gens.append(bytes(img))
    for n, g in enumerate(gens, 1):
        with open(os.path.join(out, f"gen{n}.img"), "wb") as f:
            f.write(g)
    print(VERSION)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
