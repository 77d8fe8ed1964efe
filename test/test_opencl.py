"""The OpenCL backend on whatever OpenCL device is here (PoCL in CI): runtime caps, the hand
kernels of kernels/, codegen against the NumPy backend, the binary cache across processes, build
errors and the fallback. The op suite (test_ops.py) runs on OpenCL through the device fixture."""
import importlib.util, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

import minift
from minift import Tensor, dtypes
from minift.runtime.device import get_device

# CI installs PoCL (.ci/run): there a missing OpenCL device is a failure, not a skip
if "opencl" not in minift.available_devices():
  if os.environ.get("CI"): raise RuntimeError("no usable OpenCL device in CI: PoCL (pocl-opencl-icd) should be installed by .ci/run")
  pytest.skip("no usable OpenCL device", allow_module_level=True)

import pyopencl as cl
from minift.backends.opencl import device as opencl_device
from minift.backends.opencl import codegen as cg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dev(): return get_device("opencl")


def both(fn, *arrays):
  """fn(*tensors) realized on NumPy and on OpenCL: (numpy results, opencl results)."""
  out = []
  for device in ("numpy", "opencl"):
    res = fn(*[Tensor(a, device=device) for a in arrays])
    res = res if isinstance(res, (list, tuple)) else [res]
    out.append([r.numpy() for r in res])
  return out


def assert_same(fn, *arrays, atol=1e-5, rtol=1e-5, exact=False):
  want, got = both(fn, *arrays)
  for w, g in zip(want, got):
    assert w.shape == g.shape and w.dtype == g.dtype, (w.shape, g.shape, w.dtype, g.dtype)
    if exact or w.dtype == np.bool_ or np.issubdtype(w.dtype, np.integer): np.testing.assert_array_equal(g, w)
    else: np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=atol, rtol=rtol)


def kernels_of(*tensors):
  return Tensor.schedule(*tensors)


rng = np.random.default_rng(0)
def randn(*shape, dtype=np.float32): return rng.standard_normal(shape).astype(dtype)


# ---- runtime

def test_caps(dev):
  caps = dev.caps
  assert caps.name and caps.driver_version and caps.platform
  assert caps.max_work_group_size >= 1 and caps.local_mem_size > 0 and caps.max_mem_alloc_size > 0
  assert caps.fp16 == ("cl_khr_fp16" in caps.extensions.split())   # gated on the extension list
  assert caps.type in ("GPU", "CPU", "ACCELERATOR", "OTHER")
  assert json.dumps(caps.as_dict(), default=str)


def test_kernel_work_group_limit(dev):
  clk, limit = dev.kernel("wg_probe", "__kernel void wg_probe(__global float* a) { a[get_global_id(0)] = 1.0f; }")
  assert 1 <= limit <= dev.caps.max_work_group_size


def test_freed_buffer_cache_reuses_and_retries(dev, monkeypatch):
  a = dev.alloc(1000, dtypes.float32)
  mem = a.data
  del a
  b = dev.alloc(1000, dtypes.float32)
  assert b.data is mem   # the freed cl.Buffer came back
  del b
  real, calls = cl.Buffer, []
  def flaky(*args, **kw):   # the first allocation fails as if the device were full
    calls.append(1)
    if len(calls) == 1: raise cl.MemoryError("out of memory")
    return real(*args, **kw)
  monkeypatch.setattr(cl, "Buffer", flaky)
  c = dev.alloc(12345, dtypes.float32)
  assert len(calls) == 2 and dev._free_bytes == 0 and c.nbytes == 12345 * 4


def test_too_large_allocation_names_the_limit(dev):
  with pytest.raises(MemoryError, match="largest single allocation"):
    dev._alloc(dev.caps.max_mem_alloc_size + 1)


def test_device_selection_by_index_and_name():
  found = opencl_device.list_devices()
  pi, di, p, d = found[-1]
  assert opencl_device.select_device(f"{pi}:{di}")[1] == d
  part = d.name.strip()[:6]
  assert part.lower() in opencl_device.select_device(part.upper())[1].name.lower()   # a case-blind substring
  with pytest.raises(RuntimeError, match="names no OpenCL device"): opencl_device.select_device("no-such-device-here")


def test_build_failure_names_the_kernel_and_carries_the_log(dev):
  with pytest.raises(opencl_device.CLBuildError) as e:
    dev.build("broken_kernel", "__kernel void broken_kernel(__global float* a) { a[0] = not_declared_anywhere; }")
  assert "broken_kernel" in str(e.value) and "not_declared_anywhere" in e.value.build_log


# ---- hand kernels (kernels/matmul_lab.py: the numbered versions)

def _lab():
  spec = importlib.util.spec_from_file_location("matmul_lab", ROOT / "kernels" / "matmul_lab.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("shape", [(37, 70, 44), (128, 64, 96)])
def test_hand_matmul(dev, version, shape):
  r = _lab().run_version(dev, version, *shape, repeat=1)
  if "skipped" in r: pytest.skip(r["skipped"])
  assert r["ok"], r


# ---- codegen against the NumPy backend

def test_views_masks_and_flips():
  x, y = randn(5, 6), randn(6, 1)
  assert_same(lambda a, b: (a.pad(((1, 2), (0, 3))).T[1:, ::2] * 2).flip(0) + b.pad(((0, 0), (1, 2)))[:4].T.sum(0), x, y)
  assert_same(lambda a: a[::-1, 1:5:2].reshape(10) - a.T.reshape(30)[3:13], x)
  assert_same(lambda a: Tensor.cat([a, a * 2, a[:2]], 0).permute(1, 0).expand(2, 6, 12) * 0.5, x)


@pytest.mark.parametrize("axis", [0, 1, 2, (0, 2), None])
def test_reduces_with_prologue_and_epilogue(axis):
  x, b = randn(4, 5, 6), randn(4, 5, 6)
  assert_same(lambda a, c: ((a * c).exp().sum(axis, keepdim=True) + 1).log(), x, b, rtol=1e-5)
  assert_same(lambda a: a.max(axis) * 2 - 1, x)


def test_grouped_reduction_in_local_memory(dev, monkeypatch):
  monkeypatch.setattr(cg, "grouped_reduce", lambda out_numel, red_numel, caps: True)
  x = randn(6, 700)
  assert_same(lambda a: [a.softmax(-1), a.max(0), a.sum(), (a * a).mean(1).sqrt()], x, rtol=1e-5)
  k = [k for k in kernels_of(Tensor(x, device="opencl").sum(1)) if k.kind == "reduce"][0]
  r = cg.render(k, (dtypes.float32,), (x.size,), dev.caps, max_local=64)
  assert r.notes["grouped"] and r.local_size == (64,) and "barrier" in r.src


def test_shared_nodes_are_computed_once(dev):
  x = randn(3, 5)
  def f(a):
    e = (a * 3).exp()
    return e * e + e
  (k,) = kernels_of(f(Tensor(x, device="opencl")))
  assert k.shared
  src = cg.render(k, (dtypes.float32,), (x.size,), dev.caps).src
  body = src[src.index("__kernel"):]   # the prelude's helpers (sigmoid_f) call exp too
  assert body.count("exp(") == 1 and "float v0 = " in body
  assert_same(f, x)


def test_vectorised_elementwise(dev):
  x, y, col = randn(6, 8), randn(8, 6), randn(6, 1)
  f = lambda a, b, c: (a * 2 + b.T).exp() / (c + 3) - a.pad(((1, 0), (0, 0)))[:6]   # adjacent, gathered, broadcast, padded rows
  (k,) = kernels_of(f(*[Tensor(v, device="opencl") for v in (x, y, col)]))
  r = cg.render(k, (dtypes.float32,) * 3, (48, 48, 6), dev.caps)
  assert r.notes["vector"] == 4 and "vload4" in r.src and "vstore4" in r.src and r.global_size[0] * 4 >= 48
  assert_same(f, x, y, col, rtol=1e-6)
  assert cg.vector_width(kernels_of(Tensor(randn(6, 6), device="opencl") * 2)[0], (dtypes.float32,)) == 1


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.bool_])
def test_dtypes(dtype):
  x = (rng.standard_normal((4, 5)) * 4).astype(dtype)
  y = (rng.standard_normal((4, 5)) * 4).astype(dtype)
  if dtype == np.bool_:
    assert_same(lambda a, b: [a + b, a * b, a.maximum(b), a == b, a.logical_not(), a.where(1.5, -2.0), a.sum(1)], x, y)
    return
  fns = lambda a, b: [a + b, a * b - a, a.maximum(b), a < b, a == b, (a > 0).where(a, b), a.sum(1), a.max(0),
                      a.cast(dtypes.float32) * 0.5, a.cast(dtypes.bool)]
  assert_same(fns, x, y, exact=True)   # float16 is rounded after every op exactly as NumPy does
  if dtype == np.float16:
    assert_same(lambda a: [a.sqrt(), a / 3], np.abs(x), exact=True)   # correctly rounded in float, then to half
    assert_same(lambda a: [a.exp(), a.sigmoid(), a.pow(2.5)], np.abs(x) / 4, rtol=1e-3)   # at most an ulp of half apart


def test_int_division_by_zero_does_not_crash():
  a = Tensor(np.array([5, -7, 0], np.int32), device="opencl")
  from minift.lazy import Op
  out = Tensor(a.lazydata.alu(Op.DIV, Tensor(np.array([0, 2, 0], np.int32), device="opencl").lazydata)).numpy()
  assert out[1] == -3


def test_special_values():
  x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 88.0, -88.0], np.float32)
  assert_same(lambda a: [a.maximum(0.0), a.max(), a.exp(), a.tanh(), a.erf(), a * 0 + 1], x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "batched", "transposed", "broadcast_weight", "gqa"])
def test_matmul_kernels(case):
  a, b = {"plain": ((33, 20), (20, 17)), "batched": ((3, 9, 20), (3, 20, 70)), "transposed": ((20, 33), (17, 20)),
          "broadcast_weight": ((2, 5, 30), (30, 65)), "gqa": ((2, 2, 3, 5, 8), (2, 2, 1, 8, 6))}[case]
  x, w = randn(*a), randn(*b)
  f = (lambda p, q: p.T @ q.T) if case == "transposed" else (lambda p, q: p @ q)
  assert_same(f, x, w, rtol=1e-5, atol=1e-5)


def test_matmul_fuses_its_epilogue(dev):
  x, w, bias = randn(40, 30), randn(20, 30), randn(20)
  f = lambda p, q, c: (p.linear(q, c)).relu() * 2
  (k,) = kernels_of(f(*[Tensor(v, device="opencl") for v in (x, w, bias)]))
  assert k.kind == "matmul"
  assert_same(f, x, w, bias)


def test_matmul_reads_half_weights_directly(dev):
  x, w = randn(40, 32), randn(24, 32, dtype=np.float16)
  f = lambda p, q: p.linear(q)
  (k,) = kernels_of(f(Tensor(x, device="opencl"), Tensor(w, device="opencl")))
  assert k.kind == "matmul" and [i.dtype for i in k.inputs] == [dtypes.float32, dtypes.float16]
  src = cg.render(k, (dtypes.float32, dtypes.float16), (x.size, w.size), dev.caps).src
  assert "vload_half" in src
  assert_same(f, x, w)


def test_matmul_image_weights(dev, monkeypatch):
  if not dev.caps.image_support: pytest.skip("no image support")
  monkeypatch.setattr(dev, "use_images", True)
  for wdtype in (np.float32, np.float16):
    x, w = randn(50, 36), randn(40, 36, dtype=wdtype)
    W = Tensor(w, device="opencl")
    buf = W.lazydata.base.buffer
    want = x @ w.astype(np.float32).T
    for step in range(3):   # an image is made on the second use of the same weight
      got = (Tensor(x, device="opencl").linear(W) + 1).numpy()
      np.testing.assert_allclose(got, want + 1, rtol=1e-5, atol=1e-5)
      assert (buf in dev._images) == (step >= 1)
    W.assign(Tensor(w * 2, device="opencl")).realize()   # a write drops the stale image
    assert W.lazydata.base.buffer is buf and buf not in dev._images
    np.testing.assert_allclose((Tensor(x, device="opencl").linear(W)).numpy(), 2 * want, rtol=1e-5, atol=1e-5)


# ---- matmul tiles for small devices (codegen/tiles.py) and the fallback when a driver refuses

from minift.codegen import tiles as tile_lib


def _matmul_tiles_used(dev, monkeypatch):
  """Patches dev.pick_tile to record the tile of every matmul it builds."""
  used, real = [], dev.pick_tile
  def spy(family, m, n, make):
    rendered, clk = real(family, m, n, make)
    used.append(rendered.notes["config"])
    return rendered, clk
  monkeypatch.setattr(dev, "pick_tile", spy)
  return used


@pytest.mark.parametrize("cls", sorted(tile_lib.TILES))
def test_every_tile_matches_numpy(dev, monkeypatch, cls):
  # ragged sizes (no tile divides them) in the tile's shape class, each tile of the class forced in turn
  m, n = {"square": (70, 90), "tall": (70, 20), "wide": (20, 90), "small": (20, 30)}[cls]
  x, w = randn(m, 45), randn(45, n)
  used = _matmul_tiles_used(dev, monkeypatch)
  for tile in tile_lib.TILES[cls]:
    if tile.threads > dev.caps.max_work_group_size: continue
    monkeypatch.setattr(tile_lib, "matmul_tiles", lambda *a, **kw: [tile])
    got = (Tensor(x, device="opencl") @ Tensor(w, device="opencl") + 1).numpy()
    np.testing.assert_allclose(got, x @ w + 1, rtol=1e-5, atol=1e-5, err_msg=str(tile))
    assert used[-1] == tile


SMALL_LIMIT_CHILD = """
import json, numpy as np
from minift import Tensor
from minift.runtime.device import get_device
dev, used = get_device("opencl"), []
real = dev.pick_tile
def spy(*a):
  r = real(*a)
  used.append(r[0].notes["config"].threads)
  return r
dev.pick_tile = spy
rng = np.random.default_rng(0)
a, b, r = rng.standard_normal((70, 40)), rng.standard_normal((40, 90)), rng.standard_normal((70, 90))
ta = Tensor(a.astype(np.float32), device="opencl", requires_grad=True)
y = (ta @ Tensor(b.astype(np.float32), device="opencl")).relu()
(y * Tensor(r.astype(np.float32), device="opencl")).sum().backward()   # a long reduction, and dy @ b.T
errs = [float(np.abs(y.numpy() - np.maximum(a @ b, 0)).max()), float(np.abs(ta.grad.numpy() - (r * (a @ b > 0)) @ b.T).max())]
print(json.dumps(dict(limit=dev.caps.max_work_group_size, used=used, errs=errs)))
"""


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory): return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("limit", [16, 32, 64, 128])
def test_small_work_group_limits(shared_cache, limit):
  # PoCL with a lowered work-group limit, as Mali and Adreno report: the biggest tile within it
  # runs (every tile of every class is checked against NumPy in test_every_tile_matches_numpy)
  r = _child(SMALL_LIMIT_CHILD, POCL_MAX_WORK_GROUP_SIZE=str(limit), MINIFT_CACHE_DIR=str(shared_cache))
  got = json.loads(r.stdout.splitlines()[-1])
  assert got["limit"] == limit
  assert max(got["errs"]) < 1e-5, got
  assert got["used"] and max(got["used"]) == limit and all(u <= limit for u in got["used"]), got   # the 128-item tile at 128


def _cl_error(code):
  return cl.RuntimeError(cl._cl._ErrorRecord("clEnqueueNDRangeKernel", code, "refused (simulated)"))


@pytest.fixture
def fresh_tiles(dev, monkeypatch, tmp_path):
  """dev with an empty cache folder and no refused tiles (restored after the test)."""
  monkeypatch.setattr(dev, "cache_dir", tmp_path)
  monkeypatch.setattr(dev, "_refused", None)
  return tmp_path


def test_build_failure_falls_back_to_the_next_tile_and_is_remembered(dev, monkeypatch, fresh_tiles):
  if dev.caps.max_work_group_size < 256: pytest.skip("needs a 256 work-item device")
  big = tile_lib.TILES["square"][0]
  real = dev.kernel
  def refuse_big(name, src):
    if name.startswith("matmul") and f"#define BM {big.bm}\n#define BN {big.bn}\n" in src and f"#define TM {big.tm}\n#define TN {big.tn}\n" in src:
      raise opencl_device.CLBuildError(name, "ptxas: too many registers (simulated)", src)
    return real(name, src)
  monkeypatch.setattr(dev, "kernel", refuse_big)
  used = _matmul_tiles_used(dev, monkeypatch)
  x, w = randn(96, 40), randn(40, 80)
  np.testing.assert_allclose((Tensor(x, device="opencl") @ Tensor(w, device="opencl")).numpy(), x @ w, rtol=1e-5, atol=1e-5)
  assert used[-1] == tile_lib.TILES["square"][1]   # the 128-item tile
  saved = json.loads((fresh_tiles / "tiles.json").read_text())
  (per_device,) = saved.values()
  (family, refused), = per_device.items()
  assert family.startswith("matmul ") and refused == {str(big): "build failed"}
  # a new process (a new device object on the same cache) does not try the refused tile again
  other = opencl_device.OpenCLDevice()
  other.cache_dir = fresh_tiles
  rendered = []
  other.pick_tile("matmul", 96, 80, lambda c: rendered.append(c) or cg.Rendered("t", "__kernel void t() {}", (1,), (1,), notes={"config": c}))
  assert rendered == [tile_lib.TILES["square"][1]]


def test_out_of_resources_at_launch_falls_back(dev, monkeypatch, fresh_tiles):
  if dev.caps.max_work_group_size < 256: pytest.skip("needs a 256 work-item device")
  # a driver that runs out of registers for groups over 64 work-items, at launch (Mali, Adreno)
  real, refused = dev._launch, []
  def launch(clk, global_size, local_size, args):
    if prod_(local_size) > 64:
      refused.append((clk.function_name, local_size))
      raise _cl_error(cl.status_code.OUT_OF_RESOURCES)
    return real(clk, global_size, local_size, args)
  prod_ = lambda s: int(np.prod(s))
  monkeypatch.setattr(dev, "_launch", launch)
  used = _matmul_tiles_used(dev, monkeypatch)
  x, w, long_rows = randn(72, 24), randn(24, 88), randn(3, 3000)
  f = lambda a, b, c: [(a @ b).softmax(-1), c.sum(-1), c.exp()]
  want = [(x @ w - (x @ w).max(-1, keepdims=True)), long_rows.sum(-1), np.exp(long_rows)]
  want[0] = np.exp(want[0]) / np.exp(want[0]).sum(-1, keepdims=True)
  got = [t.numpy() for t in f(*[Tensor(v, device="opencl") for v in (x, w, long_rows)])]
  for g, wv in zip(got, want): np.testing.assert_allclose(g, wv, rtol=1e-4, atol=1e-5)
  assert [t.threads for t in used] == [256, 128, 64]   # each refusal, the next smaller tile
  assert {name.split('_')[0] for name, _ in refused} == {'matmul', 'r', 'elementwise'}   # reductions and elementwise kernels retried smaller too
  saved = json.loads((fresh_tiles / "tiles.json").read_text())
  (per_device,) = saved.values()
  (refused_tiles,) = per_device.values()
  assert set(refused_tiles) == {str(t) for t in tile_lib.TILES["square"] if t.threads > 64}
  assert set(refused_tiles.values()) == {"CL_OUT_OF_RESOURCES at launch"}


def test_refused_image_launch_falls_back_to_a_smaller_image_tile(dev, monkeypatch, fresh_tiles):
  if not dev.caps.image_support or dev.caps.max_work_group_size < 256: pytest.skip("needs image support and a 256 work-item device")
  monkeypatch.setattr(dev, "use_images", True)
  real, refused = dev._launch, []
  def launch(clk, global_size, local_size, args):
    if clk.function_name.endswith("_image") and int(np.prod(local_size)) > 64:
      refused.append(local_size)
      raise _cl_error(cl.status_code.OUT_OF_RESOURCES)
    return real(clk, global_size, local_size, args)
  monkeypatch.setattr(dev, "_launch", launch)
  x, w = randn(80, 36), randn(72, 36)
  W = Tensor(w, device="opencl")
  for _ in range(2):   # the second use of the weight reads it from an image
    np.testing.assert_allclose(Tensor(x, device="opencl").linear(W).numpy(), x @ w.T, rtol=1e-5, atol=1e-5)
  assert len(refused) == 2   # the 256- and 128-item image tiles
  (per_device,) = json.loads((fresh_tiles / "tiles.json").read_text()).values()
  assert [k.split()[0] for k in per_device] == ["matmul_image"] and len(next(iter(per_device.values()))) == 2


def test_no_tile_names_what_was_tried(dev, monkeypatch, fresh_tiles):
  real = dev.kernel
  def refuse_matmuls(name, src):
    if name.startswith("matmul"): raise opencl_device.CLBuildError(name, "error: out of registers (simulated)", src)
    return real(name, src)
  monkeypatch.setattr(dev, "kernel", refuse_matmuls)
  with pytest.raises(RuntimeError, match=r"(?s)no matmul tile for a 64x48 output runs on .*build failed.*last build log:.*out of registers"):
    (Tensor(randn(64, 8), device="opencl") @ Tensor(randn(8, 48), device="opencl")).numpy()
  assert not (fresh_tiles / "tiles.json").exists()   # a source that never builds is no refusal to remember


def test_gather_scatter_add_and_index_errors():
  table, idx = randn(10, 6), np.array([[3, 1, 3], [9, 0, 3]], np.int64)
  want, got = [], []
  for device in ("numpy", "opencl"):
    t = Tensor(table, device=device, requires_grad=True)
    out = t.embedding(Tensor(idx, device=device))
    (out * Tensor(np.arange(36, dtype=np.float32).reshape(2, 3, 6), device=device)).sum().backward()
    (want if device == "numpy" else got).append((out.numpy(), t.grad.numpy()))
  np.testing.assert_array_equal(got[0][0], want[0][0])
  np.testing.assert_array_equal(got[0][1], want[0][1])   # deterministic, same order of additions
  with pytest.raises(IndexError, match="out of range"):
    Tensor(table, device="opencl").embedding(Tensor(np.array([2, 10]), device="opencl")).numpy()


def test_rand_is_bit_identical():
  out = []
  for device in ("numpy", "opencl"):
    Tensor.manual_seed(1234)
    Tensor.rand(3, 5, device=device)   # advance the counter
    out.append((Tensor.rand(1000, device=device).numpy(), Tensor.randn(7, device=device).numpy()))
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)   # log, sqrt and cos differ by an ulp or so


def test_copies_between_devices():
  x = randn(4, 3)
  t = Tensor(x, device="opencl")
  back = (t.to("numpy") * 2).to("opencl")
  assert back.device == "opencl"
  np.testing.assert_array_equal(back.numpy(), x * 2)


def test_assign_in_place_and_through_a_reversed_view():
  x = randn(5, 4)
  t = Tensor(x.copy(), device="opencl")
  buf = t.lazydata.base.buffer
  t.assign(t * 2 + 1).realize()
  assert t.lazydata.base.buffer is buf
  t.assign(t.flip(0)).realize()   # reads other elements of the target: must not race
  np.testing.assert_array_equal(t.numpy(), (x * 2 + 1)[::-1])


def test_zero_size_and_scalar():
  assert_same(lambda a: [a * 2, a.sum(0)], randn(0, 3))
  assert_same(lambda a: a.sum() * 3, randn(1))


def test_debug4_prints_source(tmp_path):
  code = "import numpy as np\nfrom minift import Tensor\nprint((Tensor(np.ones(3, np.float32), device='opencl') * 5).numpy())"
  r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DEBUG="4", PYTHONPATH=str(ROOT)),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "__kernel void elementwise_3" in r.stdout and "[5. 5. 5.]" in r.stdout


# ---- compile cache and fallback, in fresh processes

def _child(code, **env):
  r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  return r


def test_second_process_compiles_nothing(tmp_path):
  code = ("import json, numpy as np\nfrom minift import Tensor\nfrom minift.runtime.device import get_device\n"
          "x = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4), device='opencl')\n"
          "y = ((x @ x.T).relu() + x.sum(1, keepdim=True)).softmax(-1).numpy()\n"
          "print(json.dumps(get_device('opencl').stats))")
  first = json.loads(_child(code, MINIFT_CACHE_DIR=str(tmp_path)).stdout.splitlines()[-1])
  second = json.loads(_child(code, MINIFT_CACHE_DIR=str(tmp_path)).stdout.splitlines()[-1])
  assert first["built"] >= 4 and first["cache_hits"] == 0
  assert second["built"] == 0 and second["cache_hits"] == first["built"]
  assert len(list((tmp_path / "cl").glob("*.bin"))) == first["built"]


def test_a_full_binary_cache_keeps_only_the_newest(tmp_path):
  code = ("import numpy as np\nfrom minift import Tensor\n"
          "x = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4), device='opencl')\n"
          "print(((x @ x.T).relu() + x.sum(1, keepdim=True)).softmax(-1).numpy().sum())")
  r = _child(code, MINIFT_CACHE_DIR=str(tmp_path), MINIFT_CACHE_MAX_MB="0.000001")   # smaller than any binary
  assert abs(float(r.stdout.split()[-1]) - 3.0) < 1e-5   # three softmax rows: the kernels still ran
  assert len(list((tmp_path / "cl").glob("*.bin"))) == 1


def test_installed_package_finds_its_kernels(tmp_path):
  # a plain (non-editable) install carries kernels/ (*.cl, *.comp, attention.c) inside the package as minift/kernels
  src, site = tmp_path / "src", tmp_path / "site"
  for part in ("minift", "models", "kernels"):   # from a clean copy: a build/ left in the checkout would be reused
    shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
  for part in ("setup.cfg", "pyproject.toml", "README.md"): shutil.copy(ROOT / part, src / part)
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert (site / "minift" / "kernels" / "matmul.cl").exists() and (site / "minift" / "kernels" / "attention.c").exists()
  assert (site / "minift" / "kernels" / "matmul.comp").exists()   # the Vulkan backend's matmul
  code = ("import numpy as np, minift\nfrom minift import Tensor\nprint(minift.__file__)\n"
          "a = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
          "print(Tensor(a, device='opencl').device, np.abs((Tensor(a, device='opencl') @ Tensor(a.T, device='opencl')).numpy() - a @ a.T).max())\n"
          # the NumPy backend's attention, compiled from the installed attention.c
          "from minift.backends.numpy.attention import attention_functions, attention_numpy\n"
          "q, k, v = (np.random.default_rng(i).standard_normal((1, 2, 40, 8)).astype(np.float32) for i in range(3))\n"
          "got = Tensor(q).scaled_dot_product_attention(Tensor(k), Tensor(v), is_causal=True).numpy()\n"
          "print(attention_functions() is not None, np.abs(got - attention_numpy(q, k, v, 8 ** -0.5, True, None)).max())")
  r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site), MINIFT_CACHE_DIR=str(tmp_path / "cache")),
                     cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  where, (device, err), (compiled, att_err) = r.stdout.splitlines()[0], r.stdout.splitlines()[1].split(), r.stdout.splitlines()[2].split()
  assert where.startswith(str(site)) and device == "opencl" and float(err) == 0.0, r.stdout + r.stderr
  assert compiled == "True" and float(att_err) < 1e-5, r.stdout + r.stderr
  assert "OpenCL unavailable" not in r.stderr


def test_fallback_when_the_device_names_nothing():
  code = ("import numpy as np\nfrom minift import Tensor\nimport minift\n"
          "t = Tensor(np.ones(3, np.float32), device='opencl') * 2\n"
          "print(t.device, minift.available_devices(), t.numpy())")
  r = _child(code, MINIFT_CL_DEVICE="no-such-device-xyz")
  assert r.stdout.split()[0] == "numpy" and "['numpy'" in r.stdout and "'opencl'" not in r.stdout
  assert r.stderr.count("OpenCL unavailable") == 1 and "no-such-device-xyz" in r.stderr


def test_kernels_with_too_many_buffers_are_split(dev, monkeypatch):
  monkeypatch.setattr(dev.caps, "max_parameter_size", 8 * 7)   # 5 input buffers at most
  splits, real_split = [], dev._split
  monkeypatch.setattr(dev, "_split", lambda k, ins: splits.append(len(ins)) or real_split(k, ins))
  xs = [randn(2, 3) for _ in range(11)]
  def f(*ts):
    c = Tensor.cat(list(ts), 0)                         # one kernel reading 11 buffers
    return [c * 2, c.sum(0) + ts[0].sum(0), (c.exp().sum(1, keepdim=True) * c).max(0)]
  (k, *_), = [[k for k in kernels_of(f(*[Tensor(x, device="opencl") for x in xs])[0]) if len(k.inputs) > 5]]
  assert len(k.inputs) == 11
  assert_same(f, *xs, rtol=1e-5)
  assert splits and max(splits) == 11
  t = Tensor(xs[0].copy(), device="opencl")
  t.assign(t + sum(Tensor(x, device="opencl") for x in xs[1:])).realize()   # an assign split, in place
  np.testing.assert_allclose(t.numpy(), sum(xs), rtol=1e-5, atol=1e-6)
