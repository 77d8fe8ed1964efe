"""Matmul kernel lab, in the style of llm.c's dev/cuda: every version with a NumPy reference,
a validation and a benchmark.

  python kernels/matmul_lab.py                 # every version on the GPT-2 shapes
  python kernels/matmul_lab.py --version 3     # one version
  python kernels/matmul_lab.py --shape 512,768,2304 --repeat 20

Versions (the .cl files next to this one):
  1  matmul_v1_naive.cl   one work-item per output, k walked in global memory
  2  matmul_v2_tiled.cl   16 x 16 tiles in local memory, one output per work-item
  3  matmul.cl            tiles in local memory plus a 4 x 4 register block per work-item
                          (what the backend runs, with the epilogue fused through MM_STORE)
  4  matmul.cl -DB_HALF   v3 reading B stored as half through vload_half (frozen weights)
  5  matmul_image.cl      weights W (N, K) in a float image2d, out = A @ W.T (texture path)
  6  matmul_image.cl      the same with half channels (CL_HALF_FLOAT)

The device is OpenCLDevice's choice (MINIFT_CL_DEVICE) and programs go through its disk cache.
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
TILE = dict(BM=64, BN=64, BK=16, TM=4, TN=4)


def _defines(**kw):
  return "".join(f"#define {k} {v}\n" for k, v in kw.items())


def _source(version, m, n, k):
  if version == 1: return "matmul_v1", _defines(MM_M=m, MM_N=n, MM_K=k) + (HERE / "matmul_v1_naive.cl").read_text()
  if version == 2: return "matmul_v2", _defines(MM_M=m, MM_N=n, MM_K=k, TS=16) + (HERE / "matmul_v2_tiled.cl").read_text()
  if version in (3, 4):
    extra = {"B_HALF": 1} if version == 4 else {}
    return "matmul", _defines(MM_M=m, MM_N=n, MM_K=k, **TILE, **extra) + (HERE / "matmul.cl").read_text()
  return "matmul_image", _defines(MM_M=m, MM_N=n, MM_K=k, **TILE) + (HERE / "matmul_image.cl").read_text()


def _launch_sizes(version, m, n, config=TILE):
  up = lambda a, b: -(-a // b) * b
  if version == 1: return (up(n, 16), up(m, 16)), (16, 16)
  if version == 2: return (up(n, 16), up(m, 16)), (16, 16)
  tx, ty = config["BN"] // config["TN"], config["BM"] // config["TM"]
  return (up(n, config["BN"]) // config["BN"] * tx, up(m, config["BM"]) // config["BM"] * ty), (tx, ty)


def run_version(dev, version, m, n, k, repeat=5, seed=0):
  """Build, validate against NumPy and time one version on one shape. Returns a dict with
  max_abs_err, tolerance, ok, seconds (best of repeat), gflops."""
  import pyopencl as cl
  from minift.dtype import dtypes
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, k), dtype=np.float32)
  b = rng.standard_normal((k, n), dtype=np.float32)
  if version in (4, 6): b = b.astype(np.float16).astype(np.float32)   # the reference sees the weights it stores
  want = a @ b
  name, src = _source(version, m, n, k)
  clk, limit = dev.kernel(name, src)
  gsize, lsize = _launch_sizes(version, m, n)
  if np.prod(lsize) > limit: return dict(ok=False, skipped=f"work-group {lsize} over the kernel limit {limit}")
  a_buf = dev.from_numpy(a, dtypes.float32)
  out = dev.alloc(m * n, dtypes.float32)
  if version in (5, 6):
    if not dev.caps.image_support: return dict(ok=True, skipped="no image support")
    w = np.ascontiguousarray(b.T)   # (N, K): the layout of a linear layer's weight
    w_buf = dev.from_numpy(w, dtypes.float16 if version == 6 else dtypes.float32)
    image = dev.weight_image(w_buf, n, k)
    args = (out.data, a_buf.data, image)
  else:
    b_buf = dev.from_numpy(b, dtypes.float16 if version == 4 else dtypes.float32)
    args = (out.data, a_buf.data, b_buf.data)
  clk(dev.queue, gsize, lsize, *args)
  got = dev.to_numpy(out).reshape(m, n)
  err = float(np.abs(got - want).max())
  tol = 1e-5 * k ** 0.5 * float(np.abs(want).max() + 1)
  best = float("inf")
  for _ in range(repeat):
    dev.queue.finish()
    t = time.perf_counter()
    clk(dev.queue, gsize, lsize, *args)
    dev.queue.finish()
    best = min(best, time.perf_counter() - t)
  return dict(ok=err <= tol, max_abs_err=err, tolerance=tol, seconds=best, gflops=2 * m * n * k / best / 1e9)


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
        print(f"{VERSIONS[v]:<24s} {m}x{n}x{k:<10} skipped: {r['skipped']}")
        continue
      failed |= not r["ok"]
      print(f"{VERSIONS[v]:<24s} {f'{m}x{n}x{k}':<18s} {r['max_abs_err']:10.2e} {'yes' if r['ok'] else 'NO':>4s} "
            f"{r['seconds'] * 1e3:9.2f} {r['gflops']:9.1f} {ref:9.1f}")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
