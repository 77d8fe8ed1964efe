"""The C loops' compiler flags and cache key on ARM (minift/backends/numpy/compiler.py), with a
compiler and /proc/cpuinfo simulated: clang on aarch64 refuses -march=native and takes
-mcpu=native; libraries built for one core are not reused on another."""
import logging, subprocess
import pytest
from minift.backends.numpy import compiler as cc_mod

NEOVERSE_N1 = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""
CORTEX_A76 = NEOVERSE_N1.replace("0xd0c", "0xd0b").replace("0x3", "0x4")   # the same Features line, another core
BIG_LITTLE = NEOVERSE_N1.replace("0xd0c", "0xd05") + "\n" + NEOVERSE_N1.replace("processor\t: 0", "processor\t: 4")


def fake_compiler(monkeypatch, refuses):
  """A Compiler whose cc accepts everything but the flags in `refuses` (without running anything)."""
  calls = []
  def cc(self, flags, c_file, so_file):
    calls.append(flags)
    bad = [f for f in flags if f in refuses]
    if bad: return subprocess.CompletedProcess([], 1, "", f"clang: error: unsupported option '{bad[0]}' for target 'aarch64-unknown-linux-gnu'\n")
    return subprocess.CompletedProcess([], 0, "", "")
  monkeypatch.setattr(cc_mod.Compiler, "_cc", cc)
  c = cc_mod.Compiler("/* prelude */")
  c.cc = "clang"
  return c, calls


def test_aarch64_clang_gets_mcpu_native(monkeypatch):
  c, calls = fake_compiler(monkeypatch, {"-march=native"})
  assert c.flags == c.FLAGS + ["-mcpu=native", "-fopenmp-simd"]
  assert calls[0][-2:] == ["-march=native", "-fopenmp-simd"]   # -march=native is still tried first


def test_x86_keeps_march_native(monkeypatch):
  c, _ = fake_compiler(monkeypatch, set())
  assert c.flags == c.FLAGS + ["-march=native", "-fopenmp-simd"]


def test_no_tuning_flag_at_all(monkeypatch):
  c, _ = fake_compiler(monkeypatch, {"-march=native", "-mcpu=native"})
  assert c.flags == c.FLAGS + ["-fopenmp-simd"]


def test_debug_says_which_flags_and_why(monkeypatch):
  monkeypatch.setattr(cc_mod, "DEBUG", 1)
  c, _ = fake_compiler(monkeypatch, {"-march=native"})
  seen = []
  handler = logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  cc_mod.log.addHandler(handler)
  try: c.flags
  finally: cc_mod.log.removeHandler(handler)
  text = "\n".join(seen)
  assert "-mcpu=native -fopenmp-simd" in text and "refused -march=native -fopenmp-simd: clang: error: unsupported option '-march=native'" in text


def test_cache_key_names_the_core(monkeypatch):
  keys = {}
  for name, text in [("n1", NEOVERSE_N1), ("a76", CORTEX_A76), ("big_little", BIG_LITTLE)]:
    monkeypatch.setattr(cc_mod, "_cpuinfo", lambda text=text: text)
    keys[name] = cc_mod._cpu_id()
  assert "CPU part=0xd0c" in keys["n1"] and "asimddp" in keys["n1"]
  assert len(set(keys.values())) == 3   # same Features, another core: another key
  assert "CPU part=0xd05,0xd0c" in keys["big_little"]
  c, _ = fake_compiler(monkeypatch, set())
  monkeypatch.setattr(cc_mod, "_cpuinfo", lambda: NEOVERSE_N1)
  n1 = c.signature
  c2, _ = fake_compiler(monkeypatch, set())
  monkeypatch.setattr(cc_mod, "_cpuinfo", lambda: CORTEX_A76)
  assert c2.signature != n1   # the libraries' names (hashes of source and signature) differ too


def test_cache_key_without_cpuinfo(monkeypatch):
  def missing(): raise OSError("no /proc")
  monkeypatch.setattr(cc_mod, "_cpuinfo", missing)
  assert cc_mod._cpu_id()


def test_arm64_check_compares_kernel_by_kernel(tmp_path):
  """tools/arm64_check.py's comparison of two traced fine-tunes (x86 against arm64 there): two
  runs on this machine agree; a C-loop kernel whose output changed for the same inputs fails it,
  and so does a BLAS product off by more than float32 rounding."""
  import json, shutil, sys
  import numpy as np
  from pathlib import Path
  tools = Path(__file__).resolve().parent.parent / "tools"
  sys.path.insert(0, str(tools))
  import arm64_check
  a, b = tmp_path / "a", tmp_path / "b"
  arm64_check.make_model(a)
  shutil.copytree(a, b)
  for work in (a, b): subprocess.run([sys.executable, str(tools / "arm64_check.py"), "--trace", str(work)], check=True, capture_output=True)
  assert arm64_check.compare(a, b) == []
  trace = json.loads((b / "trace.json").read_text())
  i = next(i for i, k in enumerate(trace) if k["kind"] == "elementwise")
  trace[i]["out"] = "0" * 40
  (b / "trace.json").write_text(json.dumps(trace))
  assert any(e.startswith(f"kernel {i} ") for e in arm64_check.compare(a, b))
  shutil.copy2(a / "trace.json", b / "trace.json")
  products = dict(np.load(b / "matmuls.npz"))
  first = min(products, key=int)
  products[first] = products[first] * np.float32(1 + 1e-3)
  np.savez(b / "matmuls.npz", **products)
  assert any("BLAS matmul" in e for e in arm64_check.compare(a, b))
