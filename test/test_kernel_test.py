"""tools/kernel_test.py, the phone test, cannot report success without testing: a kernel that
writes nothing fails, skips are counted apart with their reasons, image kernels are not built
on a device without images, and the exit code is 0 only when everything the device runs passed."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import minift

if "opencl" not in minift.available_devices():
  if os.environ.get("CI"): raise RuntimeError("no usable OpenCL device in CI: PoCL (pocl-opencl-icd) should be installed by .ci/run")
  pytest.skip("no usable OpenCL device", allow_module_level=True)

from minift.runtime.device import get_device
from minift.backends.opencl import codegen as cg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kt():
  spec = importlib.util.spec_from_file_location("kernel_test", ROOT / "tools" / "kernel_test.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def dev(): return get_device("opencl")


NOTHING = "__kernel void matmul_v2(__global float* out, __global const float* A, __global const float* B) { }\n"


def test_a_kernel_that_writes_nothing_fails(kt, dev, monkeypatch):
  lab = kt._lab()
  assert lab.run_version(dev, 1, 40, 24, 16, repeat=1)["ok"]   # leaves its correct result in the freed-buffer cache
  real = lab._square_source
  monkeypatch.setattr(lab, "_square_source", lambda version, *a: ("matmul_v2", NOTHING) if version == 2 else real(version, *a))
  r = lab.run_version(dev, 2, 40, 24, 16, repeat=1)
  assert not r["ok"] and np.isnan(r["max_abs_err"])


def test_a_fused_graph_that_writes_nothing_fails(kt, dev, monkeypatch):
  real = cg.render_elementwise
  def planted(kernel, in_dtypes, idx, max_local):   # the same kernel with an empty body
    r = real(kernel, in_dtypes, idx, max_local)
    r.src = r.src[:r.src.index("{", r.src.index("__kernel"))] + "{ }\n"
    return r
  monkeypatch.setattr(cg, "render_elementwise", planted)
  monkeypatch.setattr(kt, "_graphs", lambda size, real=kt._graphs: [g for g in real(size) if g[0] == "gelu (tanh)"])
  (graph,) = kt._graphs("tiny")
  want = graph[2](graph[3], "numpy")[0].numpy()
  stale = [dev.from_numpy(want, minift.dtypes.float32) for _ in range(4)]
  del stale   # the freed-buffer cache now holds the right answer: only the NaN fill makes the planted kernel fail
  (row,) = kt.fused_graphs(dev, "tiny", repeat=1)
  assert row["status"] == "fail" and row["max_abs_err"] == float("inf")
  assert not dev.poison   # poisoning is only for the check's own run


def test_max_error_treats_missing_writes_as_failures(kt):
  w = np.array([1.0, np.nan, 3.0])
  assert kt.max_error([np.array([1.0, np.nan, 3.5])], [w]) == 0.5   # NaN where NumPy has NaN too is fine
  assert kt.max_error([np.array([1.0, 2.0, np.nan])], [w]) == float("inf")
  assert kt.max_error([np.zeros(2)], [np.zeros(3)]) == float("inf")


def test_image_kernels_are_not_built_without_image_support(kt, dev, monkeypatch):
  monkeypatch.setattr(dev.caps, "image_support", False)
  real = dev.kernel
  def no_images(name, src):
    assert "image2d_t" not in src, "an image kernel was built on a device without images"
    return real(name, src)
  monkeypatch.setattr(dev, "kernel", no_images)
  lab = kt._lab()
  for v in (5, 6): assert lab.run_version(dev, v, 40, 24, 16, repeat=1) == dict(ok=False, skipped="no image support")
  monkeypatch.setattr(dev.caps, "image_support", True)
  monkeypatch.setattr(dev.caps, "image_formats", ("RGBA/FLOAT",))   # float images but no half ones
  assert lab.run_version(dev, 6, 40, 24, 16, repeat=1)["skipped"] == "no RGBA/HALF_FLOAT read-only image2d format"


def test_pass_fail_and_skip_are_counted_apart(kt):
  ok, bad = dict(status="pass"), dict(status="fail")
  lacks = dict(status="skip", reason="no image support", unsupported=True)
  could = dict(status="skip", reason="not tried", unsupported=False)
  assert kt.summarize([ok, ok, lacks]) == ({"pass": 2, "fail": 0, "skip": 1, "skip_unsupported": 1}, 0)
  assert kt.summarize([ok, bad])[1] == 1
  assert kt.summarize([ok, could]) == ({"pass": 1, "fail": 0, "skip": 1, "skip_unsupported": 0}, 1)
  assert kt.summarize([lacks])[1] == 1   # nothing ran: no success to report


def test_run_on_a_64_item_device_reports_everything(tmp_path):
  # the phone test on PoCL with the work-group limit of many phone GPUs (CI also runs --quick so)
  out = tmp_path / "report.json"
  r = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_test.py"), "--tiny", "--repeat", "1", "--json", str(out)],
                     env=dict(os.environ, POCL_MAX_WORK_GROUP_SIZE="64", MINIFT_CACHE_DIR=str(tmp_path / "cache")),
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  report = json.loads(out.read_text())
  caps = report["caps"]
  assert caps["max_work_group_size"] == 64 and len(caps["max_work_item_sizes"]) == 3
  assert caps["preferred_work_group_multiple"] >= 1 and isinstance(caps["denormals"], bool) and caps["single_fp_config"]
  assert caps["image_support"] == bool(caps["image_formats"])
  results = report["results"]
  assert {r["status"] for r in results} <= {"pass", "skip"} and all(r["reason"] for r in results if r["status"] == "skip")
  hand = [r for r in results if r["check"].startswith("matmul")]
  assert len(hand) == 6 and all(np.prod(r["local_size"]) <= 64 for r in hand if r["status"] == "pass")
  assert report["summary"]["pass"] == len(results) - report["summary"]["skip"] and report["summary"]["exit_code"] == 0
  assert f"{report['summary']['pass']} passed, 0 failed" in r.stdout


def test_oclgrind_check_fails_on_an_out_of_bounds_write():
  # the CI step that runs the kernels under Oclgrind must fail when a kernel writes out of bounds
  spec = importlib.util.spec_from_file_location("oclgrind_check", ROOT / "tools" / "oclgrind_check.py")
  og = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(og)
  if not any(Path(p).exists() for p in og.LIBRARY_PLACES) and not os.environ.get("OCLGRIND_ICD_LIB"):
    if os.environ.get("CI"): raise RuntimeError("no Oclgrind in CI: .ci/run should install the oclgrind package")
    pytest.skip("Oclgrind is not installed")
  r = subprocess.run([sys.executable, str(ROOT / "tools" / "oclgrind_check.py"), "--planted-oob"], capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "FAIL" in r.stdout and "Invalid write of size 4" in r.stdout and "planted_oob" in r.stdout
