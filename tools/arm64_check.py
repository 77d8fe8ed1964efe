"""Check minift's ARM CPU path (a phone that trains on its CPU) on an x86 machine: a Debian arm64
chroot made with debootstrap, run through qemu-user-static as a Neoverse-N1.

  sudo python tools/arm64_check.py                     # build the chroot once, then test
  sudo python tools/arm64_check.py --chroot /var/tmp/minift-arm64 --cc clang

Steps: debootstrap --arch=arm64 (Python, gcc, clang) into --chroot, unless it is there already;
a copy of this checkout in it and a fresh venv with `pip install -e .[test]` (the same package
index as pip here: PIP_INDEX_URL, pip.conf and the CA bundles that PIP_CERT, SSL_CERT_FILE or
REQUESTS_CA_BUNDLE name are passed through); then, with
QEMU_CPU=neoverse-n1 (qemu's default "max" CPU makes torch's reference matmuls wrong),
test/test_cloops.py and test/test_cpu_flags.py, and a 3-step tiny GPT-2 LoRA fine-tune run
both here and in the chroot on the same model files (made here: torch's random initialization
itself differs between x86 and arm64 in the last bit), every kernel's inputs and output hashed:
- every kernel that is not a BLAS matmul (the compiled C loops: elementwise, reductions,
  attention, optimizer) and that got bit-identical inputs on both must give a bit-identical output;
- a BLAS matmul (OpenBLAS has its own kernels per instruction set, summing in another order)
  must agree within float32 rounding (relative to the output's largest value, <= 1e-5), and so
  must the 3 losses.
DEBUG=1 in the chroot prints the compiler flags the C loops use there.
Needs root, debootstrap, qemu-user-static with its binfmt_misc entry, and a Debian mirror
(--mirror); slow: the chroot takes minutes to make and the tests run emulated.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = "python3,python3-venv,python3-pip,python3-dev,gcc,clang,libc6-dev,ca-certificates,git"
CERT_VARS = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")   # CA bundles (a proxy's own CA): copied in, at the same paths
ROUNDING = 1e-5   # BLAS matmuls and the losses: largest difference relative to the largest value
FINETUNE = ["--max_steps", "3", "--batch_size", "2", "--seq_len", "32", "--lr", "1e-2", "--quiet"]


def run(cmd, **kw):
  print("+", " ".join(str(c) for c in cmd), flush=True)
  return subprocess.run([str(c) for c in cmd], check=True, **kw)


def chroot_run(chroot, cmd, env=None):
  base = dict(PATH="/venv/bin:/usr/local/bin:/usr/bin:/bin", HOME="/root", QEMU_CPU="neoverse-n1", LANG="C.UTF-8")
  for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "CC") + CERT_VARS:
    if k in os.environ: base[k] = os.environ[k]
  return run([shutil.which("chroot"), chroot, *cmd], env={**base, **(env or {})})   # found on this machine's PATH, not the chroot's


def make_model(work):
  """A tiny GPT-2 folder and its training text in `work` (needs torch: made on this machine)."""
  sys.path.insert(0, str(ROOT / "test"))
  from tiny_lm import save_tiny, TEXT
  save_tiny("gpt2", Path(work, "model"))
  Path(work, "text.txt").write_text(TEXT)


def trace(work):
  """Run the 3-step fine-tune of `work`'s model in this process, recording every kernel: name,
  kind, sha1 of each input and of the output, and a BLAS matmul's output itself. Writes
  work/trace.json and work/matmuls.npz. (Runs in the chroot as well as here.)"""
  import hashlib
  import numpy as np
  sys.path.insert(0, str(ROOT))
  from minift.runtime.device import get_device
  from minift.runtime.executor import timing
  sys.path.insert(0, str(ROOT / "tools"))
  import finetune
  kernels, matmuls = [], {}
  def digest(device, buf): return hashlib.sha1(np.ascontiguousarray(device.to_numpy(buf)).tobytes()).hexdigest()
  def report(kernel, ins, out, seconds, paging):
    device, kind = get_device(kernel.device), getattr(kernel, "kind", "fused")
    if kind == "matmul": matmuls[str(len(kernels))] = device.to_numpy(out)
    kernels.append(dict(name=kernel.name, kind=kind, ins=[digest(device, b) for b in ins], out=digest(device, out)))
  with timing(report):
    finetune.main(["--model", f"{work}/model", "--data", f"{work}/text.txt", "--out", f"{work}/out", *FINETUNE])
  Path(work, "trace.json").write_text(json.dumps(kernels))
  np.savez(Path(work, "matmuls.npz"), **matmuls)


def losses(work):
  return [json.loads(line)["loss"] for line in Path(work, "out", "metrics.jsonl").read_text().splitlines() if line.strip()]


def compare(x86, arm):
  """What differs between the two traces: a list of lines (empty: the check passed)."""
  import numpy as np
  def relative(a, b): return float(np.max(np.abs(np.float64(a) - b)) / max(float(np.max(np.abs(a))), 1e-30)) if np.size(a) else 0.0
  ka, kb = (json.loads(Path(w, "trace.json").read_text()) for w in (x86, arm))
  if [k["name"] for k in ka] != [k["name"] for k in kb]: return ["the two runs launched different kernels"]
  ma, mb = (np.load(Path(w, "matmuls.npz")) for w in (x86, arm))
  errors, same_in, blas = [], 0, []
  for i, (a, b) in enumerate(zip(ka, kb)):
    if a["ins"] != b["ins"]: continue   # a difference from an earlier BLAS matmul reached it
    same_in += 1
    if a["kind"] == "matmul": blas.append(relative(ma[str(i)], mb[str(i)]))
    elif a["out"] != b["out"]: errors.append(f"kernel {i} {a['name']}: the same inputs gave a different output")
  la, lb = losses(x86), losses(arm)
  print(f"{len(ka)} kernels, {same_in} with bit-identical inputs on both: {same_in - len(blas) - len(errors)} C-loop kernels "
        f"bit-identical, {len(errors)} not; {len(blas)} BLAS matmuls, largest relative difference {max(blas, default=0):.2g}")
  print(f"losses x86:   {la}\nlosses arm64: {lb}")
  if max(blas, default=0) > ROUNDING: errors.append(f"a BLAS matmul differs by more than {ROUNDING:g} of its largest value")
  if len(la) != 3 or len(lb) != 3 or max(relative([x], [y]) for x, y in zip(la, lb)) > ROUNDING:
    errors.append(f"the losses differ by more than {ROUNDING:g}")
  return errors


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--chroot", default="/var/tmp/minift-arm64", help="the arm64 chroot folder (made if missing)")
  p.add_argument("--suite", default="bookworm", help="Debian suite (default bookworm)")
  p.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
  p.add_argument("--cc", default="gcc", choices=["gcc", "clang"], help="C compiler for the C loops in the chroot")
  p.add_argument("--trace", metavar="WORK", help=argparse.SUPPRESS)   # the chroot's side: run and record the fine-tune in WORK
  args = p.parse_args()
  if args.trace: return trace(args.trace)
  if os.geteuid() != 0: sys.exit("arm64_check: needs root (debootstrap, chroot, mounts)")
  for tool in ("debootstrap", "chroot"):
    if not shutil.which(tool): sys.exit(f"arm64_check: {tool} is missing (apt-get install debootstrap qemu-user-static)")
  if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
    sys.exit("arm64_check: no binfmt_misc entry for qemu-aarch64 (install qemu-user-static; in a container, register it on the host)")
  chroot = Path(args.chroot)
  if not (chroot / "usr/bin/python3").exists():
    run(["debootstrap", "--arch=arm64", f"--include={PACKAGES}", args.suite, chroot, args.mirror])
  src = chroot / "checkout"   # not /minift: run from /, that folder would be imported as the package
  if src.exists(): shutil.rmtree(src)
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  for f in files:   # the checkout as it is, uncommitted edits included
    if (ROOT / f).is_file():
      (src / f).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / f, src / f)
  for conf in ("/etc/pip.conf", "/root/.config/pip/pip.conf", "/root/.pip/pip.conf"):
    if Path(conf).exists():
      (chroot / conf.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(conf, chroot / conf.lstrip("/"))
  shutil.copy2("/etc/resolv.conf", chroot / "etc/resolv.conf")
  for bundle in {os.environ[k] for k in CERT_VARS if os.path.isfile(os.environ.get(k, ""))}:
    (chroot / bundle.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bundle, chroot / bundle.lstrip("/"))
  mounts = [("proc", chroot / "proc", ["-t", "proc", "proc"]), ("dev", chroot / "dev", ["--bind", "/dev"])]
  for _, where, how in mounts: run(["mount", *how, where])
  try:
    if not (chroot / "venv/bin/python").exists(): chroot_run(chroot, ["python3", "-m", "venv", "/venv"])
    chroot_run(chroot, ["pip", "install", "-q", "-e", "/checkout[test]"])
    chroot_run(chroot, ["python", "-m", "pytest", "/checkout/test/test_cloops.py", "/checkout/test/test_cpu_flags.py", "-q", "-x"], {"CC": args.cc})
    arm_work = chroot / "tmp/minift-ft"
    if arm_work.exists(): shutil.rmtree(arm_work)
    make_model(arm_work)   # the same model files on both sides
    # DEBUG=1: the fine-tune prints the compiler flags the C loops use there
    chroot_run(chroot, ["python", "/checkout/tools/arm64_check.py", "--trace", "/tmp/minift-ft"], {"CC": args.cc, "DEBUG": "1"})
  finally:
    for _, where, _ in reversed(mounts): subprocess.run(["umount", "-l", where])
  with tempfile.TemporaryDirectory() as work:
    shutil.copytree(arm_work / "model", Path(work, "model"))
    shutil.copy2(arm_work / "text.txt", work)
    # this machine's own compiler: --cc names the chroot's (the C loops should agree across compilers too)
    subprocess.run([sys.executable, __file__, "--trace", work], check=True)
    errors = compare(work, arm_work)
  if errors: sys.exit("arm64_check: FAIL: " + "; ".join(errors))
  print("arm64_check: test_cloops passed under qemu (neoverse-n1); the C loops gave bit-identical outputs, BLAS and the losses agree within float32 rounding")

if __name__ == "__main__":
  main()
