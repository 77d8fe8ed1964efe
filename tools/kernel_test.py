"""Check minift's OpenCL backend on this machine: the command to run on a phone (Termux).

  python tools/kernel_test.py              # caps, every hand kernel, fused graphs vs NumPy
  python tools/kernel_test.py --quick      # small shapes only (a minute on a phone)
  python tools/kernel_test.py --json out.json

Lists the OpenCL platforms, devices and the caps of the one minift picks (MINIFT_CL_DEVICE to
choose), runs every hand-written kernel of kernels/ and a set of fused graphs built with the
Tensor API (softmax, layernorm, cross-entropy, a GPT-2 block forward and backward) on OpenCL and
on NumPy, and prints one row per check: max abs error, pass/fail, and GFLOP/s (matmuls) or GB/s
(memory-bound graphs). Exits 1 if any check fails, 2 if there is no usable OpenCL device.
"""
import argparse, importlib.util, json, sys, time
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


def _lab():
  spec = importlib.util.spec_from_file_location("matmul_lab", ROOT / "kernels" / "matmul_lab.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def hand_kernels(dev, quick, repeat):
  lab = _lab()
  shapes = [(100, 70, 36), (256, 768, 768)] if quick else [(100, 70, 36)] + lab.GPT2_SHAPES
  rows = []
  for m, n, k in shapes:
    for v, name in lab.VERSIONS.items():
      if v in (1, 2) and m * n * k > 512 * 768 * 768: continue   # the slow references only on small shapes
      r = lab.run_version(dev, v, m, n, k, repeat=repeat)
      if "skipped" in r:
        rows.append(dict(check=f"matmul {name}", shape=f"{m}x{n}x{k}", ok=True, skipped=r["skipped"]))
        continue
      rows.append(dict(check=f"matmul {name}", shape=f"{m}x{n}x{k}", max_abs_err=r["max_abs_err"], ok=r["ok"],
                       rate=r["gflops"], unit="GFLOP/s"))
  return rows


# ---- fused graphs: the same Tensor code on OpenCL and on NumPy

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


def _graphs(quick):
  """(name, shape text, build(arrays, device) -> list of output Tensors, input arrays, bytes, flops)."""
  from minift import Tensor
  rng = np.random.default_rng(0)
  rows, width = (256, 1024) if quick else (512, 4096)
  x = rng.standard_normal((rows, width)).astype(np.float32)
  vocab = 2048 if quick else 50257
  logits = rng.standard_normal((256 if quick else 512, vocab)).astype(np.float32)
  target = rng.integers(0, vocab, logits.shape[0]).astype(np.int64)
  B, T, C, H = (2, 32, 64, 4) if quick else (4, 128, 768, 12)
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


def fused_graphs(dev, quick, repeat):
  from minift import Tensor
  rows = []
  for name, shape, build, arrays, nbytes, flops in _graphs(quick):
    want = [t.numpy() for t in Tensor.realize_all(*build(arrays, "numpy"))]
    got = [t.numpy() for t in Tensor.realize_all(*build(arrays, "opencl"))]   # also compiles
    err = max(float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0 for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) if w.size else 0.0 for w in want)
    tol = 1e-4 * max(scale, 1.0)
    best = float("inf")
    for _ in range(repeat):
      t = time.perf_counter()
      Tensor.realize_all(*build(arrays, "opencl"))
      dev.synchronize()
      best = min(best, time.perf_counter() - t)
    row = dict(check=name, shape=shape, max_abs_err=err, ok=bool(err <= tol and all(g.shape == w.shape for g, w in zip(got, want))))
    if flops: row.update(rate=flops / best / 1e9, unit="GFLOP/s")
    else: row.update(rate=nbytes / best / 1e9, unit="GB/s")
    row["ms"] = best * 1e3
    rows.append(row)
  return rows


def main():
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small shapes only")
  p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
  p.add_argument("--repeat", type=integer(1), default=3, help="timed runs per check (best is reported)")
  args = p.parse_args()
  if args.json: check_output(args.json, "--json")
  report = dict(platforms=[], caps=None, results=[])
  try:
    report["platforms"] = list_platforms()
  except Exception as e:   # no pyopencl or no ICD loader
    print(f"cannot list OpenCL platforms: {type(e).__name__}: {e}")
  from minift.runtime import device
  dev = device.start("opencl")   # the device the Tensor API uses; None (and a warning saying why) if unusable
  if dev is None:
    for r in report["platforms"]: print(f"  {r['index']}  {r['platform']} / {r['device']}")
    reason = device.unavailable.get("opencl", "unknown reason")
    if args.json:
      with writing(args.json): Path(args.json).write_text(json.dumps(dict(report, error=f"no usable OpenCL device: {reason}"), indent=1))
    raise NoDevice(f"no usable OpenCL device ({reason}); MINIFT_CL_DEVICE picks one of the devices listed above")

  print("OpenCL platforms and devices:")
  for r in report["platforms"]: print(f"  {r['index']}  {r['platform']} / {r['device']} ({r['type']}, {r['version']}, driver {r['driver']})")
  caps = dev.caps.as_dict()
  report["caps"] = {k: v for k, v in caps.items() if k != "extensions"}
  print(f"\nusing {dev.caps.name}:")
  for k, v in report["caps"].items(): print(f"  {k:<22s} {v}")
  results = hand_kernels(dev, args.quick, args.repeat) + fused_graphs(dev, args.quick, args.repeat)
  report["results"], report["kernel_cache"] = results, dict(dev.stats, dir=str(dev.cache_dir))
  print(f"\n{'check':<32s} {'shape':<18s} {'max abs err':>12s} {'result':>7s} {'rate':>16s}")
  for r in results:
    if "skipped" in r:
      print(f"{r['check']:<32s} {r['shape']:<18s} {'':>12s} {'skip':>7s}  {r['skipped']}")
      continue
    rate = f"{r['rate']:.2f} {r['unit']}" if "rate" in r else ""
    print(f"{r['check']:<32s} {r['shape']:<18s} {r['max_abs_err']:12.3e} {'pass' if r['ok'] else 'FAIL':>7s} {rate:>16s}")
  failed = [r for r in results if not r["ok"]]
  print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed; programs built {dev.stats['built']}, "
        f"loaded from the cache {dev.stats['cache_hits']} ({dev.cache_dir})")
  if args.json:
    with writing(args.json): Path(args.json).write_text(json.dumps(report, indent=1, default=str))
  sys.exit(1 if failed else 0)


class NoDevice(UserError):
  status = 2   # as documented: 1 is a failed check


if __name__ == "__main__":
  run(main)
