"""Matmul work-group tiles chosen from what a device reports, for any GPU backend (limits in,
tiles out: nothing here knows OpenCL or Vulkan), and for the kernel lab and tools/kernel_test.py.

A tile is BM x BN outputs per work-group, TM x TN of them per work-item (sums in registers) and
BK deep in local memory: a (BN / TN) x (BM / TM) work-group. Each shape class has one tile per
work-group size of 256, 128, 64, 32 and 16 work-items: phone GPUs report limits from 1024 down
to 64 (and less for kernels that use many registers), and drivers refuse big groups at build or
at launch when registers run out. The tiles to try are those that fit, biggest first; a backend
moves to the next one when a driver refuses the current one, and remembers the refusal.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class MatmulConfig:
  """A tile of BM x BN outputs per work-group, TM x TN per work-item, BK deep in local memory."""
  bm: int
  bn: int
  bk: int
  tm: int
  tn: int

  @property
  def local_size(self): return (self.bn // self.tn, self.bm // self.tm)

  @property
  def threads(self): return (self.bn // self.tn) * (self.bm // self.tm)

  def local_bytes(self): return 4 * self.bk * (self.bm + self.bn + 2)   # the A and B slices, each row padded by 1

  def __str__(self): return f"{self.bm}x{self.bn}x{self.bk}/{self.tm}x{self.tn}"


C = MatmulConfig
# per shape class, one tile for each work-group size (256, 128, 64, 32, 16 work-items); fewer
# work-items hold more sums each, so that a small group still reuses what it stages
TILES = {
  "square": (C(64, 64, 16, 4, 4), C(64, 32, 16, 4, 4), C(32, 32, 16, 4, 4), C(32, 16, 16, 4, 4), C(16, 16, 16, 4, 4)),
  "tall": (C(64, 16, 16, 4, 1), C(64, 16, 16, 4, 2), C(32, 16, 16, 4, 2), C(32, 16, 16, 4, 4), C(16, 16, 16, 4, 4)),    # n < 64 (LoRA's B)
  "wide": (C(16, 64, 16, 1, 4), C(16, 64, 16, 2, 4), C(16, 32, 16, 2, 4), C(16, 32, 16, 4, 4), C(16, 16, 16, 4, 4)),    # m < 64
  "small": (C(16, 16, 16, 1, 1), C(16, 16, 16, 2, 1), C(16, 16, 16, 2, 2), C(16, 16, 16, 4, 2), C(16, 16, 16, 4, 4)),
}
del C


def shape_class(m, n):
  return "square" if m >= 64 and n >= 64 else "tall" if m >= 64 else "wide" if n >= 64 else "small"


def matmul_tiles(m, n, max_threads, max_sizes=None, local_mem=None, refused=()):
  """The tiles to try for an (m, n) output, best first: those of its shape class whose
  work-group has at most max_threads work-items (the device's limit, or a built kernel's) and
  sides within max_sizes (the device's max work-item sizes), with BK halved (down to 4) until
  the tile fits local_mem bytes; less the tiles in `refused` (str() of tiles a driver refused)."""
  out = []
  for tile in TILES[shape_class(m, n)]:
    x, y = tile.local_size
    if tile.threads > max_threads or (max_sizes and (x > max_sizes[0] or y > max_sizes[1])): continue
    while local_mem is not None and tile.local_bytes() > local_mem and tile.bk > 4:
      tile = MatmulConfig(tile.bm, tile.bn, tile.bk // 2, tile.tm, tile.tn)
    if local_mem is not None and tile.local_bytes() > local_mem: continue
    if str(tile) not in refused and tile not in out: out.append(tile)
  return out


def square_group(max_threads, largest=16):
  """The side of the largest square work-group of a power of two per side, at most `largest`,
  within max_threads work-items (the lab's v2 kernel)."""
  side = largest
  while side > 1 and side * side > max_threads: side //= 2
  return side
