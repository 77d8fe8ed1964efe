import pytest
import minift


def _devices():
  # "opencl" only where minift really has it (available_devices() falls back silently otherwise)
  return ["numpy"] + [d for d in minift.available_devices() if d == "opencl"]


@pytest.fixture(params=_devices())
def device(request):
  return request.param


@pytest.fixture(autouse=True)
def _reset_global_state():
  """Tests must not leak Tensor.training / no_grad / the RNG seed into each other."""
  training, no_grad = minift.Tensor.training, minift.Tensor.no_grad
  yield
  minift.Tensor.training, minift.Tensor.no_grad = training, no_grad
