"""Check minift's GPU backends on this machine: the command to run on a phone (Termux).

  python tools/kernel_test.py                    # OpenCL: caps, every hand kernel, fused graphs vs NumPy
  python tools/kernel_test.py --device vulkan    # the same on Vulkan
  python tools/kernel_test.py --quick            # small shapes only (a minute on a phone)
  python tools/kernel_test.py --tiny             # tiny shapes, for slow simulators (tools/oclgrind_check.py)
  python tools/kernel_test.py --json out.json

Lists the OpenCL platforms and devices (or the Vulkan devices) and the caps of the one minift picks
(MINIFT_CL_DEVICE / MINIFT_VK_DEVICE to choose), runs the hand-written matmul kernels of kernels/
(OpenCL: every version of matmul_lab.py, with the work-groups and tiles the backend picks for this
device; Vulkan: matmul.comp with float and half B) and a set of fused graphs built with the Tensor
API (softmax, layernorm, cross-entropy, a GPT-2 block forward and backward) on the device and on
NumPy, and prints one row per check: pass, FAIL or skip, max abs error, GFLOP/s (matmuls) or GB/s
(memory-bound graphs).

Every output is filled with NaN before its kernel runs, so a kernel that writes nothing fails.
A check errors out as a failure; it is skipped only when the device lacks what it needs (image
support, an image format), and the row says why. Exits 0 only when every check the device can
run passed; 1 on any failure or any check skipped for another reason; 2 if there is no usable
device. --json also carries the device's limits (work-group and work-item sizes, local memory,
image formats, float32 denormal support, ...), the tiles chosen and every result.
"""
import argparse, functools, importlib.util, json, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minift.errors import ArgumentParser, UserError, check_output, integer, run, writing


def list_platforms():
  """Every platform and device, as printable lines (and a list of dicts for --json)."""
  from minift.backends.opencl.device import list_devices, device_type_name
  rows = []
  for pi, di, p, d in list_devices():
    rows.append(dict(index=f"{pi}:{di}", platform=p.name.strip(), device=d.name.strip(), type=device_type_name(d),
                     version=d.version.strip(), driver=d.driver_version.strip()))
  return rows


def list_vulkan_devices():
  """Every Vulkan device the loader lists, as dicts (index, device, type, version)."""
  from minift.backends.vulkan import vk
  instance = vk.Instance(validation=False)
  try:
    return [dict(index=str(i), platform="Vulkan", device=vk._text(p.deviceName), type=vk.DEVICE_TYPES.get(p.deviceType, "other"),
                 version=f"Vulkan {vk.version_str(p.apiVersion)}", driver=vk.driver_version_str(p.vendorID, p.driverVersion))
            for i, _, p in instance.physical_devices()]
  finally:
    instance.close()


@functools.cache
def _lab():
  spec = importlib.util.spec_from_file_location("matmul_lab", ROOT / "kernels" / "matmul_lab.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _failed(check, shape, e):
  return dict(check=check, shape=shape, status="fail", error=f"{type(e).__name__}: {e}"[:2000])


def hand_kernels(dev, size, repeat):
  """One row per hand kernel version and shape; size: "full", "quick" or "tiny"."""
  lab = _lab()
  shapes = {"tiny": [(37, 20, 12)], "quick": [(100, 70, 36), (256, 768, 768)]}.get(size, [(100, 70, 36)] + lab.GPT2_SHAPES)
  rows = []
  for m, n, k in shapes:
    for v, name in lab.VERSIONS.items():
      if v in (1, 2) and m * n * k > 512 * 768 * 768: continue   # the slow references only on small shapes
      check, shape = f"matmul {name}", f"{m}x{n}x{k}"
      try: r = lab.run_version(dev, v, m, n, k, repeat=repeat)
      except Exception as e:
        rows.append(_failed(check, shape, e))
        continue
      if "skipped" in r:   # the lab skips only what this device lacks (lab.unsupported)
        rows.append(dict(check=check, shape=shape, status="skip", reason=r["skipped"], unsupported=True))
        continue
      row = dict(check=check, shape=shape, status="pass" if r["ok"] else "fail", max_abs_err=r["max_abs_err"],
                 tolerance=r["tolerance"], rate=r["gflops"], unit="GFLOP/s", local_size=r["local_size"])
      if "tile" in r: row["tile"] = r["tile"]
      rows.append(row)
  return rows


def vulkan_matmuls(dev, size, repeat):
  """kernels/matmul.comp on its default row-major bindings (float B, and half B where the device
  has 16-bit storage) against NumPy, with the tile the backend picks for this device; the output
  starts as NaN."""
  from minift.helpers import read_kernel
  from minift.codegen.tiles import matmul_tiles
  vk, rng, rows = dev.vk, np.random.default_rng(0), []
  shapes = {"tiny": [(20, 12, 8)], "quick": [(100, 70, 36), (256, 768, 768)],
            "full": [(100, 70, 36), (512, 768, 768), (512, 3072, 768), (512, 768, 3072)]}[size]
  target = dev.target
  for m, n, k in shapes:
    for half in ([False, True] if dev.storage.half16 else [False]):
      check, shape = f"matmul.comp {'half B' if half else 'float'}", f"{m}x{n}x{k}"
      try:
        c = matmul_tiles(m, n, target.max_invocations, target.max_size[:2], target.shared_bytes)[0]
        a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
        if half: b = b.astype(np.float16)
        defines = dict(MM_M=m, MM_N=n, MM_K=k, BM=c.bm, BN=c.bn, BK=c.bk, TM=c.tm, TN=c.tn, **({"B_HALF": 1} if half else {}))
        src = dev.storage.head() + "".join(f"#define {key} {v}\n" for key, v in defines.items()) + read_kernel("matmul.comp")
        kernel = vk.kernel(f"matmul_{'half' if half else 'float'}_{m}x{n}x{k}", src, 3)
        ma, mb, mo = vk.alloc(a.nbytes), vk.alloc(b.nbytes), vk.alloc(m * n * 4)
        vk.upload(ma, a)
        vk.upload(mb, b)
        vk.upload(mo, np.full(m * n, np.nan, np.float32))   # a kernel that writes nothing fails
        best = float("inf")
        for _ in range(max(repeat, 1)):
          t = time.perf_counter()
          vk.dispatch(kernel, (-(-n // c.bn), -(-m // c.bm), 1), [mo, ma, mb])
          vk.flush()
          best = min(best, time.perf_counter() - t)
        got, want = vk.download(mo, np.float32).reshape(m, n), a @ b.astype(np.float32)
        for mem in (ma, mb, mo): vk.free(mem)
      except Exception as e:
        rows.append(_failed(check, shape, e))
        continue
      err, tol = max_error([got], [want]), 1e-3 * max(1.0, float(np.abs(want).max()))
      rows.append(dict(check=check, shape=shape, status="pass" if err <= tol else "fail", max_abs_err=err, tolerance=tol,
                       rate=2 * m * n * k / best / 1e9, unit="GFLOP/s", tile=str(c)))
  return rows


# ---- fused graphs: the same Tensor code on the device and on NumPy

def gpt2_block(x, p, n_head):
  """A GPT-2 block (pre-LayerNorm attention and GELU MLP, residuals) on (B, T, C) x."""
  B, T, C = x.shape
  h = x.layernorm(p["ln1_w"], p["ln1_b"])
  q, k, v = h.linear(p["attn_w"], p["attn_b"]).split(C, dim=2)               # 3 x (B, T, C)
  q, k, v = [t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v)]   # (B, nh, T, hd)
  y = q.scaled_dot_product_attention(k, v, is_causal=True)                     # (B, nh, T, hd)
  x = x + y.transpose(1, 2).reshape(B, T, C).linear(p["proj_w"], p["proj_b"])
  h = x.layernorm(p["ln2_w"], p["ln2_b"])
  return x + h.linear(p["fc_w"], p["fc_b"]).gelu("tanh").linear(p["fc2_w"], p["fc2_b"])


def gpt2_params(C, rng):
  shapes = dict(ln1_w=(C,), ln1_b=(C,), attn_w=(3 * C, C), attn_b=(3 * C,), proj_w=(C, C), proj_b=(C,),
                ln2_w=(C,), ln2_b=(C,), fc_w=(4 * C, C), fc_b=(4 * C,), fc2_w=(C, 4 * C), fc2_b=(C,))
  return {k: rng.standard_normal(s).astype(np.float32) * (0.02 if len(s) == 2 else 0.1) + (1.0 if k in ("ln1_w", "ln2_w") else 0.0)
          for k, s in shapes.items()}


SIZES = {  # (rows, width) of the row-wise graphs, (rows, vocab) of cross-entropy, (B, T, C, heads) of the block
  "full": ((512, 4096), (512, 50257), (4, 128, 768, 12)),
  "quick": ((256, 1024), (256, 2048), (2, 32, 64, 4)),
  "tiny": ((8, 64), (8, 96), (1, 8, 16, 2)),
}


def _graphs(size):
  """(name, shape text, build(arrays, device) -> list of output Tensors, input arrays, bytes, flops)."""
  from minift import Tensor
  rng = np.random.default_rng(0)
  (rows, width), (n_logits, vocab), (B, T, C, H) = SIZES[size]
  x = rng.standard_normal((rows, width)).astype(np.float32)
  logits = rng.standard_normal((n_logits, vocab)).astype(np.float32)
  target = rng.integers(0, vocab, logits.shape[0]).astype(np.int64)
  xb = rng.standard_normal((B, T, C)).astype(np.float32)
  params = gpt2_params(C, rng)
  gelu_x = rng.standard_normal((rows, width)).astype(np.float32)

  def softmax(a, dev): return [Tensor(a["x"], device=dev).softmax(-1)]
  def layernorm(a, dev): return [Tensor(a["x"], device=dev).layernorm()]
  def gelu(a, dev): return [Tensor(a["x"], device=dev).gelu("tanh")]
  def cross_entropy(a, dev):
    lg = Tensor(a["logits"], device=dev, requires_grad=True)
    loss = lg.cross_entropy(Tensor(a["target"], device=dev))
    loss.backward()
    return [loss, lg.grad]
  def block_fwd(a, dev):
    p = {k: Tensor(v, device=dev) for k, v in a["params"].items()}
    return [gpt2_block(Tensor(a["x"], device=dev), p, H)]
  def block_bwd(a, dev):
    p = {k: Tensor(v, device=dev, requires_grad=True) for k, v in a["params"].items()}
    xt = Tensor(a["x"], device=dev, requires_grad=True)
    out = gpt2_block(xt, p, H)
    (out * Tensor(a["r"], device=dev)).sum().backward()
    return [out, xt.grad] + [p[k].grad for k in sorted(p)]

  mm_flops = 2 * B * T * C * (3 * C + C + 4 * C + 4 * C) + 4 * B * T * T * C
  f32 = 4
  return [
    ("softmax", f"{rows}x{width}", softmax, dict(x=x), 2 * x.size * f32, 0),
    ("layernorm", f"{rows}x{width}", layernorm, dict(x=x), 2 * x.size * f32, 0),
    ("gelu (tanh)", f"{rows}x{width}", gelu, dict(x=gelu_x), 2 * x.size * f32, 0),
    ("cross-entropy fwd+bwd", f"{logits.shape[0]}x{vocab}", cross_entropy, dict(logits=logits, target=target), 2 * logits.size * f32, 0),
    ("gpt2 block forward", f"B{B} T{T} C{C}", block_fwd, dict(x=xb, params=params), 0, mm_flops),
    ("gpt2 block fwd+bwd", f"B{B} T{T} C{C}", block_bwd, dict(x=xb, params=params, r=rng.standard_normal((B, T, C)).astype(np.float32)), 0, 3 * mm_flops),
  ]


def max_error(got, want):
  """Largest |got - want| over the outputs; inf where shapes differ or got has NaN where want has
  none (a kernel that wrote nothing into a NaN-filled output)."""
  err = 0.0
  for g, w in zip(got, want):
    if g.shape != w.shape: return float("inf")
    if not g.size: continue
    g, w = g.astype(np.float64), w.astype(np.float64)
    if (np.isnan(g) != np.isnan(w)).any(): return float("inf")
    err = max(err, float(np.nanmax(np.abs(g - w))) if not np.isnan(w).all() else 0.0)
  return err


def fused_graphs(dev, size, repeat):
  from minift import Tensor
  name_of = dev.name
  rows = []
  for name, shape, build, arrays, nbytes, flops in _graphs(size):
    try:
      want = [t.numpy() for t in Tensor.realize_all(*build(arrays, "numpy"))]
      dev.poison = True   # every buffer the device run allocates starts as NaN
      try: got = [t.numpy() for t in Tensor.realize_all(*build(arrays, name_of))]   # also compiles
      finally: dev.poison = False
      err = max_error(got, want)
      scale = max(float(np.nanmax(np.abs(w))) if w.size and not np.isnan(w).all() else 0.0 for w in want)
      tol = 1e-4 * max(scale, 1.0)
      best = float("inf")
      for _ in range(repeat):
        t = time.perf_counter()
        Tensor.realize_all(*build(arrays, name_of))
        dev.synchronize()
        best = min(best, time.perf_counter() - t)
    except Exception as e:
      rows.append(_failed(name, shape, e))
      continue
    row = dict(check=name, shape=shape, status="pass" if err <= tol else "fail", max_abs_err=err, tolerance=tol)
    if flops: row.update(rate=flops / best / 1e9, unit="GFLOP/s")
    else: row.update(rate=nbytes / best / 1e9, unit="GB/s")
    row["ms"] = best * 1e3
    rows.append(row)
  return rows


def summarize(results):
  """(counts, exit code): 0 only when something passed, nothing failed and nothing was skipped
  that the device could have run (a skip for a missing feature is fine)."""
  counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
  counts["skip_unsupported"] = sum(r["status"] == "skip" and r.get("unsupported", False) for r in results)
  bad = counts["fail"] or counts["skip"] > counts["skip_unsupported"] or not counts["pass"]
  return counts, 1 if bad else 0


def main():
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--device", default="opencl", choices=["opencl", "vulkan"], help="the GPU backend to check (default: opencl)")
  p.add_argument("--quick", action="store_true", help="small shapes only")
  p.add_argument("--tiny", action="store_true", help="tiny shapes (simulators such as Oclgrind)")
  p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
  p.add_argument("--repeat", type=integer(1), default=3, help="timed runs per check (best is reported)")
  args = p.parse_args()
  if args.json: check_output(args.json, "--json")
  title = {"opencl": "OpenCL", "vulkan": "Vulkan"}[args.device]
  report = dict(device=args.device, platforms=[], caps=None, results=[])
  try:
    report["platforms"] = list_platforms() if args.device == "opencl" else list_vulkan_devices()
  except Exception as e:   # no pyopencl or ICD loader; no Vulkan loader
    print(f"cannot list {title} devices: {type(e).__name__}: {e}")
  from minift.runtime import device
  dev = device.start(args.device)   # the device the Tensor API uses; None (and a warning saying why) if unusable
  if dev is None:
    for r in report["platforms"]: print(f"  {r['index']}  {r['platform']} / {r['device']}")
    reason = device.unavailable.get(args.device, "unknown reason")
    if args.json:
      with writing(args.json): Path(args.json).write_text(json.dumps(dict(report, error=f"no usable {title} device: {reason}"), indent=1))
    pick = "MINIFT_CL_DEVICE picks one of the devices listed above" if args.device == "opencl" else "MINIFT_VK_DEVICE picks one of the devices listed above"
    raise NoDevice(f"no usable {title} device ({reason}); {pick}")

  print(f"{title} {'platforms and devices' if args.device == 'opencl' else 'devices'}:")
  for r in report["platforms"]: print(f"  {r['index']}  {r['platform']} / {r['device']} ({r['type']}, {r['version']}, driver {r['driver']})")
  report["caps"] = {k: v for k, v in dev.caps.as_dict().items() if k != "memory_types"}
  print(f"\nusing {dev.caps.name}:")
  for k, v in report["caps"].items():
    if k != "extensions": print(f"  {k:<30s} {v}")
  size = "tiny" if args.tiny else "quick" if args.quick else "full"
  hand = hand_kernels(dev, size, args.repeat) if args.device == "opencl" else vulkan_matmuls(dev, size, args.repeat)
  results = hand + fused_graphs(dev, size, args.repeat)
  counts, code = summarize(results)
  if args.device == "opencl":
    kernel_cache = dict(dev.stats, dir=str(dev.cache_dir))
    cache = f"programs built {dev.stats['built']}, loaded from the cache {dev.stats['cache_hits']} ({dev.cache_dir})"
    refused = {f: dict(t) for f, t in (dev._refused or {}).items() if t}
  else:
    stats = dev.vk.compiler.stats
    kernel_cache = dict(stats, pipelines=dev.stats["pipelines"], submits=dev.stats["submits"], dir=str(dev.cache_dir))
    cache = f"shaders compiled {stats['compiled']}, loaded from the cache {stats['cache_hits']} ({dev.cache_dir})"
    refused = {}
  report.update(results=results, summary=dict(counts, exit_code=code), kernel_cache=kernel_cache, refused_tiles=refused)
  print(f"\n{'check':<32s} {'shape':<18s} {'result':>6s} {'max abs err':>12s} {'rate':>16s}  tile / why")
  for r in results:
    if r["status"] == "skip": tail = f"{'':>12s} {'':>16s}  {r['reason']}" + ("" if r.get("unsupported") else " (the device could run it)")
    elif "error" in r: tail = f"{'':>12s} {'':>16s}  {r['error'].splitlines()[0]}"
    else: tail = f"{r['max_abs_err']:12.3e} {r['rate']:>9.2f} {r['unit']:<6s}  {r.get('tile', '')}"
    print(f"{r['check']:<32s} {r['shape']:<18s} {r['status'] if r['status'] != 'fail' else 'FAIL':>6s} {tail}")
  for family, tiles in report["refused_tiles"].items():
    for tile, why in tiles.items(): print(f"refused {family.split()[0]} tile {tile}: {why}")
  print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
        f"({counts['skip_unsupported']} not supported by this device); {cache}")
  if args.json:
    with writing(args.json): Path(args.json).write_text(json.dumps(report, indent=1, default=str))
  sys.exit(code)


class NoDevice(UserError):
  status = 2   # as documented: 1 is a failed check


if __name__ == "__main__":
  run(main)
