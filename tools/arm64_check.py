"""Check minift's ARM CPU path (a phone that trains on its CPU) on an x86 machine: a Debian arm64
chroot made with debootstrap, run through qemu-user-static as a Neoverse-N1.

  sudo python tools/arm64_check.py                     # build the chroot once, then test
  sudo python tools/arm64_check.py --chroot /var/tmp/minift-arm64 --cc clang

Steps: debootstrap --arch=arm64 (Python, gcc, clang) into --chroot, unless it is there already;
a copy of this checkout in it and a fresh venv with `pip install -e .[test]` (the same package
index as pip here: PIP_INDEX_URL, pip.conf and the CA bundles that PIP_CERT, SSL_CERT_FILE or
REQUESTS_CA_BUNDLE name are passed through); then, with
QEMU_CPU=neoverse-n1 (qemu's default "max" CPU makes torch's reference matmuls wrong),
test/test_cloops.py and test/test_cpu_flags.py, and a 3-step tiny GPT-2 LoRA fine-tune whose
losses are compared with the same run on this machine (the compiled C loops should give
bit-identical losses). DEBUG=1 in the chroot prints the compiler flags the C loops use there.
Needs root, debootstrap, qemu-user-static with its binfmt_misc entry, and a Debian mirror
(--mirror); slow: the chroot takes minutes to make and the tests run emulated.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = "python3,python3-venv,python3-pip,python3-dev,gcc,clang,libc6-dev,ca-certificates,git"
CERT_VARS = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")   # CA bundles (a proxy's own CA): copied in, at the same paths
FINETUNE = """
import json, sys
sys.path.insert(0, "{root}/test")
from tiny_lm import save_tiny, TEXT
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
save_tiny("gpt2", out / "model")
(out / "text.txt").write_text(TEXT)
"""


def run(cmd, **kw):
  print("+", " ".join(str(c) for c in cmd), flush=True)
  return subprocess.run([str(c) for c in cmd], check=True, **kw)


def chroot_run(chroot, cmd, env=None):
  base = dict(PATH="/venv/bin:/usr/local/bin:/usr/bin:/bin", HOME="/root", QEMU_CPU="neoverse-n1", LANG="C.UTF-8")
  for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "CC") + CERT_VARS:
    if k in os.environ: base[k] = os.environ[k]
  return run([shutil.which("chroot"), chroot, *cmd], env={**base, **(env or {})})   # found on this machine's PATH, not the chroot's


def finetune(python, root, work, env):
  """3 steps of tools/finetune.py on a tiny GPT-2 made in `work`: the training losses."""
  subprocess.run([python, "-c", FINETUNE.format(root=root), work], check=True, env=env)
  subprocess.run([python, f"{root}/tools/finetune.py", "--model", f"{work}/model", "--data", f"{work}/text.txt", "--out", f"{work}/out",
                  "--max_steps", "3", "--batch_size", "2", "--seq_len", "32", "--lr", "1e-2", "--quiet"], check=True, env=env)


def losses(folder):
  return [json.loads(line)["loss"] for line in Path(folder, "out", "metrics.jsonl").read_text().splitlines() if line.strip()]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--chroot", default="/var/tmp/minift-arm64", help="the arm64 chroot folder (made if missing)")
  p.add_argument("--suite", default="bookworm", help="Debian suite (default bookworm)")
  p.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
  p.add_argument("--cc", default="gcc", choices=["gcc", "clang"], help="C compiler for the C loops in the chroot")
  args = p.parse_args()
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
    cc = {"CC": args.cc, "DEBUG": "1"}   # DEBUG=1: the fine-tune prints the compiler flags the C loops use there
    chroot_run(chroot, ["python", "-m", "pytest", "/checkout/test/test_cloops.py", "/checkout/test/test_cpu_flags.py", "-q", "-x"], {"CC": args.cc})
    arm_work = chroot / "tmp/minift-ft"
    if arm_work.exists(): shutil.rmtree(arm_work)
    chroot_run(chroot, ["python", "-c", FINETUNE.format(root="/checkout"), "/tmp/minift-ft"], cc)
    chroot_run(chroot, ["python", "/checkout/tools/finetune.py", "--model", "/tmp/minift-ft/model", "--data", "/tmp/minift-ft/text.txt",
                        "--out", "/tmp/minift-ft/out", "--max_steps", "3", "--batch_size", "2", "--seq_len", "32", "--lr", "1e-2", "--quiet"], cc)
  finally:
    for _, where, _ in reversed(mounts): subprocess.run(["umount", "-l", where])
  with tempfile.TemporaryDirectory() as work:
    finetune(sys.executable, ROOT, work, dict(os.environ, PYTHONPATH=str(ROOT), CC=args.cc))
    x86 = losses(work)
  arm = losses(arm_work)
  print(f"losses x86:   {x86}\nlosses arm64: {arm}")
  if len(arm) != 3 or arm != x86:
    diff = max((abs(a - b) for a, b in zip(arm, x86)), default=float("inf"))
    sys.exit(f"arm64_check: FAIL: the arm64 losses differ from x86 (largest difference {diff:.3g})")
  print("arm64_check: test_cloops passed under qemu (neoverse-n1); the 3 losses are bit-identical to x86")


if __name__ == "__main__":
  main()
