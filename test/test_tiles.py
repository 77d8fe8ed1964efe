"""Matmul tile choice for small devices (minift/codegen/tiles.py): limits in, tiles out. The
kernels each tile renders are checked against NumPy in test_opencl.py."""
import pytest
from minift.codegen.tiles import TILES, matmul_tiles, shape_class, square_group

SHAPES = {"square": (512, 768), "tall": (512, 16), "wide": (8, 768), "small": (20, 30)}


@pytest.mark.parametrize("limit", [16, 32, 64, 128, 256, 1024])
@pytest.mark.parametrize("cls", sorted(SHAPES))
def test_every_limit_down_to_16_has_a_tile_that_fills_it(cls, limit):
  m, n = SHAPES[cls]
  assert shape_class(m, n) == cls
  got = matmul_tiles(m, n, limit)
  assert got and all(t.threads <= limit for t in got)
  assert got[0].threads == min(limit, 256)   # the biggest group the limit allows, a 128-item one at 128
  assert [t.threads for t in got] == sorted((t.threads for t in got), reverse=True)   # the fallback chain: smaller and smaller
  for t in got:   # each work-item's block divides its tile, so the group covers it exactly
    assert t.bm % t.tm == 0 and t.bn % t.tn == 0 and t.local_size[0] * t.local_size[1] == t.threads


def test_below_16_items_there_is_no_tile():
  assert matmul_tiles(512, 768, 8) == []


def test_work_item_sizes_per_dimension():
  # a device whose second dimension takes at most 8 work-items (max_work_item_sizes[1])
  got = matmul_tiles(512, 768, 256, max_sizes=(256, 8))
  assert got and all(t.local_size[1] <= 8 for t in got)
  assert got[0].threads == 64


def test_local_memory_halves_the_depth():
  full = matmul_tiles(512, 768, 256)[0]
  assert full.local_bytes() > 4096
  got = matmul_tiles(512, 768, 256, local_mem=4096)
  assert got and all(t.local_bytes() <= 4096 and t.bk >= 4 for t in got)
  assert (got[0].bm, got[0].bn, got[0].tm, got[0].tn) == (full.bm, full.bn, full.tm, full.tn) and got[0].bk < full.bk
  assert matmul_tiles(512, 768, 256, local_mem=256) == []   # nothing fits even 4 deep


def test_refused_tiles_are_skipped():
  first, second = matmul_tiles(512, 768, 256)[:2]
  assert str(first) == "64x64x16/4x4"   # the name tiles.json keeps
  assert matmul_tiles(512, 768, 256, refused={str(first): "build failed"})[0] == second


def test_square_group():
  assert [square_group(n) for n in (1024, 256, 128, 64, 32, 16, 8, 1)] == [16, 16, 8, 8, 4, 4, 2, 1]
  assert square_group(256, largest=4) == 4


def test_every_tile_is_listed_once_per_group_size():
  for cls, tiles in TILES.items():
    assert [t.threads for t in tiles] == [256, 128, 64, 32, 16], cls
