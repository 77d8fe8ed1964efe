"""Matmul kernel lab, in the style of llm.c's dev/cuda: every version with a NumPy reference,
a validation and a benchmark.

  python kernels/matmul_lab.py                 # every version on the GPT-2 shapes
  python kernels/matmul_lab.py --version 3     # one version
  python kernels/matmul_lab.py --shape 512,768,2304 --repeat 20

Versions (the .cl files next to this one):
  1  matmul_v1_naive.cl   one work-item per output, k walked in global memory
  2  matmul_v2_tiled.cl   16 x 16 tiles in local memory, one output per work-item
  3  matmul.cl            tiles in local memory plus a register block per work-item (what the
                          backend runs, with the epilogue fused through MM_STORE)
  4  matmul.cl -DB_HALF   v3 reading B stored as half through vload_half (frozen weights)
  5  matmul_image.cl      weights W (N, K) in a float image2d, out = A @ W.T (texture path)
  6  matmul_image.cl      the same with half channels (CL_HALF_FLOAT)

The device is OpenCLDevice's choice (MINIFT_CL_DEVICE) and programs go through its disk cache.
Work-groups and tiles are the backend's choice for the device (minift/codegen/tiles.py): v1/v2
use the largest square group of at most 16 x 16 that fits, v3-v6 the tile OpenCLDevice.pick_tile
picks (the biggest that the device's and the kernel's limits allow, smaller when a driver refuses).
"""
import argparse, sys, time
from pathlib import Path
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VERSIONS = {1: "v1 naive", 2: "v2 local tiles", 3: "v3 tiles + registers", 4: "v4 v3 + half B",
            5: "v5 image2d float W", 6: "v6 image2d half W"}
# (M, N, K) of a GPT-2-small step at batch 4 x 128 tokens: forward linears, the lm head, and a
# weight gradient (x.T @ dy)
GPT2_SHAPES = [(512, 2304, 768), (512, 768, 768), (512, 3072, 768), (512, 768, 3072), (768, 3072, 512)]
def _defines(**kw):
  return "".join(f"#define {k} {v}\n" for k, v in kw.items())


def _up(a, b): return -(-a // b) * b


def _square_source(version, m, n, k, side):
  """(kernel name, source) of v1, or of v2 with side x side tiles."""
  if version == 1: return "matmul_v1", _defines(MM_M=m, MM_N=n, MM_K=k) + (HERE / "matmul_v1_naive.cl").read_text()
  return "matmul_v2", _defines(MM_M=m, MM_N=n, MM_K=k, TS=side) + (HERE / "matmul_v2_tiled.cl").read_text()


def _square_kernel(dev, version, m, n, k):
  """(cl.Kernel, local size) of v1/v2: the largest square work-group of at most 16 x 16 that
  the device and the built kernel take (v2's tile side is its work-group side)."""
  from minift.codegen.tiles import square_group
  side = square_group(min(dev.caps.max_work_group_size, *dev.caps.max_work_item_sizes[:2]))
  while True:
    clk, limit = dev.kernel(*_square_source(version, m, n, k, side))
    if side * side <= limit or side == 1: break
    side = square_group(limit, side // 2)   # this kernel takes fewer work-items than the device
  return clk, (side, side)


def _tiled_source(version, m, n, k, config):
  """The backend's matmul templates (v3-v6) with one tile (codegen/tiles.MatmulConfig)."""
  from minift.backends.opencl.codegen import Rendered
  extra = {"B_HALF": 1} if version == 4 else {}
  name, file = ("matmul", "matmul.cl") if version in (3, 4) else ("matmul_image", "matmul_image.cl")
  src = _defines(MM_M=m, MM_N=n, MM_K=k, BM=config.bm, BN=config.bn, BK=config.bk, TM=config.tm, TN=config.tn, **extra)
  tx, ty = config.local_size
  gsize = (_up(n, config.bn) // config.bn * tx, _up(m, config.bm) // config.bm * ty)
  return Rendered(name, src + (HERE / file).read_text(), gsize, (tx, ty), notes={"config": config})


def unsupported(dev, version):
  """Why the device cannot run a version (a missing feature), or None."""
  if version in (5, 6):
    if not dev.caps.image_support: return "no image support"
    fmt = "RGBA/HALF_FLOAT" if version == 6 else "RGBA/FLOAT"
    if fmt not in dev.caps.image_formats: return f"no {fmt} read-only image2d format"
  return None


def run_version(dev, version, m, n, k, repeat=5, seed=0):
  """Build, validate against NumPy and time one version on one shape, with the work-group and
  tile the backend would choose on this device (v3-v6: OpenCLDevice.pick_tile, falling back to
  a smaller tile when the driver refuses one at build or launch). The output is filled with NaN
  first, so a kernel that writes nothing fails. Returns a dict with ok, max_abs_err, tolerance,
  seconds (best of repeat), gflops, local_size and tile (v3-v6); or ok=False and skipped (the
  reason) when the device cannot run this version."""
  import pyopencl as cl
  from minift.backends.opencl.device import REFUSED_LAUNCH
  from minift.dtype import dtypes
  why = unsupported(dev, version)
  if why: return dict(ok=False, skipped=why)   # before building: a device without images cannot build v5/v6
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, k), dtype=np.float32)
  b = rng.standard_normal((k, n), dtype=np.float32)
  if version in (4, 6): b = b.astype(np.float16).astype(np.float32)   # the reference sees the weights it stores
  want = a @ b
  a_buf = dev.from_numpy(a, dtypes.float32)
  out = dev.alloc(m * n, dtypes.float32)
  if version in (5, 6):
    w = np.ascontiguousarray(b.T)   # (N, K): the layout of a linear layer's weight
    w_buf = dev.from_numpy(w, dtypes.float16 if version == 6 else dtypes.float32)
    args = (out.data, a_buf.data, dev.weight_image(w_buf, n, k))
  else:
    b_buf = dev.from_numpy(b, dtypes.float16 if version == 4 else dtypes.float32)
    args = (out.data, a_buf.data, b_buf.data)
  family = "matmul" if version in (3, 4) else "matmul_image"
  refused = {}
  while True:   # until the driver takes a launch; each refusal, the next smaller tile
    config = None
    if version in (1, 2):
      clk, lsize = _square_kernel(dev, version, m, n, k)
      gsize = (_up(n, lsize[0]), _up(m, lsize[1]))
    else:
      rendered, clk = dev.pick_tile(family, m, n, lambda c: _tiled_source(version, m, n, k, c))
      config, gsize, lsize = rendered.notes["config"], rendered.global_size, rendered.local_size
    cl.enqueue_fill_buffer(dev.queue, out.data, np.float32(np.nan), 0, out.nbytes)   # a kernel that writes nothing fails
    try:
      clk(dev.queue, gsize, lsize, *args)
      dev.queue.finish()
      break
    except cl.Error as e:
      if config is None or getattr(e, "code", None) not in REFUSED_LAUNCH: raise
      refused[str(config)] = f"{REFUSED_LAUNCH[e.code]} at launch"
      dev.refuse_tiles(family, {str(config): refused[str(config)]}, persist=False)
  if refused: dev.refuse_tiles(family, refused, persist=True)   # a smaller tile ran: remember the refusal
  got = dev.to_numpy(out).reshape(m, n)
  err = float(np.abs(got - want).max())   # NaN where the kernel wrote nothing
  tol = 1e-5 * k ** 0.5 * float(np.abs(want).max() + 1)
  best = float("inf")
  for _ in range(repeat):
    dev.queue.finish()
    t = time.perf_counter()
    clk(dev.queue, gsize, lsize, *args)
    dev.queue.finish()
    best = min(best, time.perf_counter() - t)
  r = dict(ok=bool(err <= tol), max_abs_err=err, tolerance=tol, seconds=best, gflops=2 * m * n * k / best / 1e9, local_size=tuple(lsize))
  if config is not None: r["tile"] = str(config)
  return r


def numpy_gflops(m, n, k, repeat=5):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
  a @ b   # warm up the BLAS threads
  best = float("inf")
  for _ in range(repeat):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return 2 * m * n * k / best / 1e9


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--version", type=int, choices=sorted(VERSIONS), action="append", help="version(s) to run (default: all)")
  p.add_argument("--shape", action="append", help="M,N,K (default: GPT-2 shapes)")
  p.add_argument("--repeat", type=int, default=5)
  args = p.parse_args()
  from minift.backends.opencl import OpenCLDevice
  dev = OpenCLDevice()
  shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else GPT2_SHAPES
  print(f"device: {dev.caps.name} ({dev.caps.platform}, driver {dev.caps.driver_version})")
  print(f"{'version':<24s} {'M x N x K':<18s} {'max err':>10s} {'ok':>4s} {'ms':>9s} {'GFLOP/s':>9s} {'numpy':>9s}")
  failed = False
  for m, n, k in shapes:
    ref = numpy_gflops(m, n, k, args.repeat)
    for v in args.version or sorted(VERSIONS):
      r = run_version(dev, v, m, n, k, args.repeat)
      if "skipped" in r:
        print(f"{VERSIONS[v]:<24s} {f'{m}x{n}x{k}':<18s} skipped: {r['skipped']}")
        continue
      failed |= not r["ok"]
      print(f"{VERSIONS[v]:<24s} {f'{m}x{n}x{k}':<18s} {r['max_abs_err']:10.2e} {'yes' if r['ok'] else 'NO':>4s} "
            f"{r['seconds'] * 1e3:9.2f} {r['gflops']:9.1f} {ref:9.1f}")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
