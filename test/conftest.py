import pytest
import minift


def _devices():
  # the GPU backends only where minift really has them (available_devices() falls back silently otherwise)
  return ["numpy", "numpy-blocks", "numpy-c"] + [d for d in minift.available_devices() if d in ("opencl", "vulkan")]


@pytest.fixture(params=_devices())
def device(request, monkeypatch):
  """The backend a test runs on. numpy-blocks is the NumPy backend evaluating every kernel of
  more than 8 elements block by block (blocks of 4), as it evaluates big kernels. numpy-c is the
  NumPy backend running every kernel it can as a compiled C loop (backends/numpy/cloops.py), as it runs big
  kernels when a C compiler is there (its chunks and column blocks made small)."""
  if request.param == "numpy-blocks":
    from minift.backends.numpy import device as numpy_device
    monkeypatch.setattr(numpy_device, "BLOCK", 4)
    monkeypatch.setattr(numpy_device, "BLOCKED_FROM", 9)
    return "numpy"
  if request.param == "numpy-c":
    from minift.backends.numpy import cloops
    if not cloops.compiler.available: pytest.fail("numpy-c: no working C compiler (cc) on this machine")
    monkeypatch.setattr(cloops, "C_FROM", 0)
    monkeypatch.setattr(cloops, "CHUNK", 8)     # reductions to one value in chunks of 8 elements,
    monkeypatch.setattr(cloops, "COLUMNS", 3)   # over leading axes 3 columns at a time: the small tensors here take every path
    return "numpy"
  return request.param


@pytest.fixture(autouse=True)
def _reset_global_state():
  """Tests must not leak Tensor.training / no_grad / the RNG seed into each other."""
  training, no_grad = minift.Tensor.training, minift.Tensor.no_grad
  yield
  minift.Tensor.training, minift.Tensor.no_grad = training, no_grad


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Tiny GPT-2 and Llama HF folders (random weights) and a text file: {"gpt2", "llama", "text"}."""
  from tiny_lm import save_tiny, TEXT
  out = {k: save_tiny(k, tmp_path_factory.mktemp(k)) for k in ("gpt2", "llama")}
  text = tmp_path_factory.mktemp("data") / "hamlet.txt"
  text.write_text(TEXT)
  out["text"] = str(text)
  return out
