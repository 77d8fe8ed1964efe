"""The runtime layer's contract: imports go one way (no cycle among minift's modules), a backend
is a Device subclass plus one registry entry (a toy one, defined here, runs kernels), the
executor and jit read declared capabilities instead of probing devices, and backends keep
their caches in their own objects, not on the scheduler's."""
import ast, gc, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from minift import Tensor
from minift.runtime import device as registry
from minift.runtime.buffer import Buffer
from minift.runtime.device import Device

MINIFT = Path(__file__).resolve().parent.parent / "minift"

# Import cycles allowed among minift's modules, each with the reason it cannot be broken. Keep
# this empty: a new entry needs a comment saying why the layering cannot hold there.
ALLOWED_CYCLES = []


def import_graph(root=MINIFT):
  """{module: {modules it imports}} over root's .py files, imports at module level and inside
  functions alike. `from pkg import name` counts as importing pkg.name where that is a module."""
  files = {}
  for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  def module_of(name):   # the longest module prefix of a dotted name
    while name and name not in files: name = name.rpartition(".")[0]
    return name or None
  graph = {}
  for mod, path in files.items():
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import): names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level: base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
      else: continue
      targets |= {m for m in map(module_of, names) if m is not None and m != mod}
    graph[mod] = targets
  return graph


def cycles(graph):
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v); on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index: visit(w); low[v] = min(low[v], low[w])
      elif w in on_stack: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop(); on_stack.discard(w); component.append(w)
        if w == v: break
      if len(component) > 1: out.append(sorted(component))
  for v in sorted(graph):
    if v not in index: visit(v)
  return out


def test_the_cycle_finder_finds_cycles():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_minift_modules():
  graph = import_graph()
  assert {"minift.tensor", "minift.runtime.executor", "minift.backends.numpy.device", "minift.codegen.cstyle"} <= set(graph)
  assert "minift.runtime.device" in graph["minift.backends.opencl.device"]   # backends import the runtime ...
  found = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
  assert not found, f"import cycles: {found}"
  for mod in ("minift.runtime.buffer", "minift.runtime.device", "minift.runtime.executor"):   # ... never the reverse
    assert not {m for m in graph[mod] if m.startswith("minift.backends")}, mod


def test_executor_and_jit_never_probe_kernels_or_devices():
  """What a device does is declared on Device (runs_attention, fuses_assigns, prepare(),
  written()), so the code that runs kernels has no hasattr/getattr standing in for it."""
  for path in [MINIFT / "runtime" / "executor.py", MINIFT / "jit.py"]:
    calls = [n.func.id for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")]
    assert not calls, (path, calls)


class ToyDevice(Device):
  """A backend in a few lines: NumPy arrays for memory, elementwise ASTs evaluated op by op."""
  name = "toy"
  OPS = {"ADD": np.add, "MUL": np.multiply, "EXP": np.exp, "NEG": np.negative}

  def __init__(self): self.ran = []
  def from_numpy(self, arr, dtype): return Buffer(self, arr.size, dtype, np.array(arr, dtype.np).reshape(-1))
  def to_numpy(self, buf): return buf.data
  def copy_in(self, buf, arr): buf.data[...] = np.asarray(arr, buf.dtype.np).reshape(-1)

  def run(self, kernel, ins, out=None, rand_key=None):
    assert kernel.kind == "elementwise", kernel
    def value(node):
      if node.op.name == "BUFFER":
        flat, view = ins[node.arg.input].data, node.arg.view
        return np.lib.stride_tricks.as_strided(flat[view.offset:], view.shape, [s * flat.itemsize for s in view.strides])
      if node.op.name == "CONST": return node.dtype.np(node.arg)
      return self.OPS[node.op.name](*map(value, node.srcs))
    self.ran.append(kernel.name)
    res = np.broadcast_to(value(kernel.ast), kernel.shape).astype(kernel.dtype.np)
    if out is None: return self.from_numpy(res, kernel.dtype)
    self.copy_in(out, res)
    return out


def test_a_toy_backend_is_one_class_and_one_registry_line(monkeypatch):
  monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
  monkeypatch.setattr(registry, "_devices", dict(registry._devices))
  registry.register("toy", ToyDevice)
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  a, b = Tensor(x, device="toy"), Tensor(x.T.copy(), device="toy").T   # b: a transposed view
  y = ((a * 2 + b) * -0.5).exp()
  assert y.device == "toy"
  np.testing.assert_allclose(y.numpy(), np.exp((x * 2 + x) * -0.5), rtol=1e-6)
  assert registry.get_device("toy").ran == ["elementwise_2x3"]   # fused into one kernel, run on the toy
  a.assign(a + 1).realize()   # an in-place update: written into a's own buffer
  np.testing.assert_array_equal(a.numpy(), x + 1)
  assert "toy" in registry.available_devices()
  with pytest.raises(ValueError, match="unknown device 'tpu'; expected one of 'numpy', 'opencl', 'vulkan', 'toy'"):
    Tensor(x, device="tpu")


def test_backends_keep_their_caches_to_themselves():
  """The NumPy backend's per-kernel state (compiled loop, blocks, matmul layouts) and per-View
  layouts live in its own weak maps: nothing is written onto kernels, AST nodes or Views, and an
  entry goes with its kernel."""
  from minift.schedule import create_schedule
  from minift.runtime.executor import run_schedule
  dev = registry.get_device("numpy")
  x, w = Tensor(np.ones((64, 96), np.float32)), Tensor(np.ones((96, 80), np.float32))
  kernels = create_schedule([((x @ w).relu() * 2).sum(1).lazydata])
  views = [n.arg.view for k in kernels for n in k._nodes() if n.op.name == "BUFFER"]
  gc.collect()
  before = len(dev._states)
  run_schedule(list(kernels))
  assert len(dev._states) == before + len(kernels)
  assert all(not k.__dict__.keys() - {"out", "inputs", "ast", "assign_target", "shape", "dtype", "device", "kind", "reduce", "shared"} for k in kernels)
  assert all(not v.__dict__.keys() - {"shape", "strides", "offset", "mask"} for v in views)
  del kernels, views
  gc.collect()
  assert len(dev._states) == before


FAULTS_OF_A_STEP = """
import resource
import numpy as np
from minift import Tensor, jit
rng = np.random.default_rng(0)
w1 = Tensor(rng.standard_normal((576, 1536)).astype(np.float32) * 0.05, requires_grad=True)
w2 = Tensor(rng.standard_normal((1536, 576)).astype(np.float32) * 0.05, requires_grad=True)
@jit
def step(x):   # an MLP stack's forward and backward: 1-3 MiB activations kept, then freed
  h = x
  for _ in range(6): h = h + ((h @ w1).relu() @ w2)
  loss = (h * h).mean()
  loss.backward()
  g1, g2 = w1.grad, w2.grad
  w1.grad = w2.grad = None
  return loss, g1, g2
x = Tensor(rng.standard_normal((512, 576)).astype(np.float32))
for _ in range(3): [t.numpy() for t in step(x)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5): [t.numpy() for t in step(x)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (hasattr(os, "confstr") and os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc's malloc settings")
def test_replayed_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
  """What a step frees stays with the process for the next step (minift/__init__.py sets glibc's
  mmap and trim thresholds): the replays fault almost no page in, where glibc's defaults
  (MINIFT_KEEP_FREED=0) hand the blocks back and fault them in again on every step."""
  def faults(keep):
    env = dict(os.environ, MINIFT_KEEP_FREED=keep, MINIFT_DEVICE="numpy")
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_STEP], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])
  default, kept = faults("0"), faults("1")
  assert default > 5 * 256, f"glibc's defaults faulted only {default} pages in over 5 steps: the test no longer sees the problem"
  assert kept < default / 20, f"{kept} page faults over 5 replayed steps with freed memory kept (glibc's defaults: {default})"
