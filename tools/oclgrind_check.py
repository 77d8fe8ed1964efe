"""Run minift's OpenCL kernels under Oclgrind, the OpenCL simulator that checks every memory
access, barrier and (with data-race checks on) every race, and fail on any error it reports.

  python tools/oclgrind_check.py                 # tools/kernel_test.py --tiny under Oclgrind
  python tools/oclgrind_check.py --planted-oob   # a kernel that writes past its buffer: must fail

kernel_test.py --tiny runs the hand matmul kernels (v1-v6) and the fused graphs (softmax,
layernorm, GELU, cross-entropy, a GPT-2 block forward and backward) at tiny sizes, so the run
takes a few minutes. Oclgrind (Debian's oclgrind package) ships no ICD file: this writes one in a
temporary folder, points OCL_ICD_VENDORS at it and MINIFT_CL_DEVICE at the Oclgrind device.
Oclgrind reports errors in its log and still lets the program finish, so the log is read
afterwards: any message in it fails the run (exit 1), as does a failing kernel_test.
"""
import argparse, os, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_PLACES = ["/usr/lib/oclgrind/liboclgrind-rt-icd.so", "/usr/lib/x86_64-linux-gnu/oclgrind/liboclgrind-rt-icd.so",
                  "/usr/local/lib/liboclgrind-rt-icd.so", "/usr/lib/liboclgrind-rt-icd.so"]
PLANTED = """
import numpy as np, pyopencl as cl
from minift.runtime.device import get_device
from minift.dtype import dtypes
dev = get_device("opencl")
assert "oclgrind" in dev.caps.platform.lower(), dev.caps.platform
out = dev.alloc(16, dtypes.float32)
clk, _ = dev.kernel("planted_oob", "__kernel void planted_oob(__global float* out) { out[get_global_id(0) + 1] = 1.0f; }")
clk(dev.queue, (16,), None, out.data)   # the last work-item writes out[16], one past the end
dev.synchronize()
print("planted kernel ran")
"""


def find_library():
  """The Oclgrind ICD library ($OCLGRIND_ICD_LIB, else the usual places)."""
  env = os.environ.get("OCLGRIND_ICD_LIB")
  for p in ([env] if env else LIBRARY_PLACES):
    if Path(p).exists(): return p
  raise SystemExit(f"oclgrind_check: no Oclgrind ICD library (looked at {env or ', '.join(LIBRARY_PLACES)}); "
                   "install Debian's oclgrind package or set OCLGRIND_ICD_LIB")


def oclgrind_env(folder, log):
  """The environment that makes minift run on Oclgrind with its checks on, logging to `log`."""
  vendors = Path(folder) / "vendors"
  vendors.mkdir(exist_ok=True)
  (vendors / "oclgrind.icd").write_text(find_library() + "\n")
  return dict(os.environ, OCL_ICD_VENDORS=str(vendors), MINIFT_CL_DEVICE="Oclgrind", OCLGRIND_DATA_RACES="1",
              OCLGRIND_LOG=str(log), OCLGRIND_MAX_ERRORS="100",
              MINIFT_CACHE_DIR=str(Path(folder) / "cache"), PYTHONPATH=str(ROOT))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--planted-oob", action="store_true", help="run a kernel with an out-of-bounds write instead (must fail)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds before the run counts as failed")
  args = p.parse_args()
  with tempfile.TemporaryDirectory(prefix="minift-oclgrind-") as folder:
    log = Path(folder) / "oclgrind.log"
    cmd = [sys.executable, "-c", PLANTED] if args.planted_oob else [sys.executable, str(ROOT / "tools" / "kernel_test.py"), "--tiny", "--repeat", "1"]
    try: rc = subprocess.run(cmd, env=oclgrind_env(folder, log), timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
      print(f"oclgrind_check: FAIL: the run took over {args.timeout:.0f} s")
      sys.exit(1)
    report = log.read_text(errors="replace").strip() if log.exists() else ""
  if report:
    lines = report.splitlines()
    print(f"oclgrind_check: FAIL: Oclgrind reported {sum('error' in l.lower() or 'invalid' in l.lower() or 'race' in l.lower() for l in lines)} "
          f"error line(s) ({len(lines)} lines of log); the first ones:")
    print("\n".join(lines[:60]))
    sys.exit(1)
  if rc != 0:
    print(f"oclgrind_check: FAIL: {'the planted kernel' if args.planted_oob else 'kernel_test.py'} exited {rc} (Oclgrind itself reported nothing)")
    sys.exit(1)
  print("oclgrind_check: no Oclgrind errors, data-race checks on")


if __name__ == "__main__":
  main()
