"""minift imports and runs without OpenCL: NumPy fallback with one clear warning line."""
import os, subprocess, sys

PROGRAM = "import numpy as np; from minift import Tensor; x = Tensor(np.ones((2, 3), np.float32)); print('device', x.device, 'sum', (x @ x.T).sum().item())"


def run(prelude="", env=None):
  return subprocess.run([sys.executable, "-c", prelude + PROGRAM], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "MINIFT_DEVICE": "opencl", **(env or {})})


def test_no_pyopencl_falls_back_to_numpy():
  r = run("import sys; sys.modules['pyopencl'] = None\n")
  assert r.returncode == 0, r.stderr
  assert "device numpy sum 12.0" in r.stdout
  warnings = [l for l in r.stderr.splitlines() if "OpenCL unavailable" in l]
  assert len(warnings) == 1 and "NumPy" in warnings[0] and "pip install 'minift[opencl]'" in warnings[0]


def test_no_opencl_platform_falls_back_to_numpy(tmp_path):
  r = run(env={"OCL_ICD_VENDORS": str(tmp_path), "OPENCL_VENDOR_PATH": str(tmp_path)})
  assert r.returncode == 0, r.stderr
  assert "device numpy sum 12.0" in r.stdout
  assert len([l for l in r.stderr.splitlines() if "OpenCL unavailable" in l]) == 1


def test_unknown_device_is_a_clear_error():
  r = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env={**os.environ, "MINIFT_DEVICE": "tpu"})
  assert r.returncode != 0 and "unknown device 'tpu'" in r.stderr and "MINIFT_DEVICE" in r.stderr
