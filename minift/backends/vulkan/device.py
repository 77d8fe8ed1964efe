"""The Vulkan backend's device: runs the scheduler's kernels as GLSL compute shaders (codegen.py;
matmuls use kernels/matmul.comp) on the Vulkan device vk.py opens (every Android phone since 7.0;
Mesa's lavapipe in CI).

Kernels are recorded, not run: every dispatch of a schedule (or of a jit replay) goes into one
command buffer, with barriers only between dependent dispatches, and submit() - which the
executor calls once the schedule's last kernel is recorded - submits it and waits on one fence.
So a realize is one submit and one wait, whatever its number of kernels; a host copy of a buffer
that recorded commands use waits for them first. An index out of range in a gather or scatter-add
is found when the recording ran (the error flag is read after the submit) and raised there.

Memory: vk.Memory sub-allocated from a few large blocks, host-visible on unified-memory devices
(phones), so uploads and downloads are copies; a tensor bigger than one binding window is bound in
pieces. A device without 8-bit storage, 16-bit storage or 64-bit integers stores bool, float16 or
int64 32 bits wide (codegen.Storage), converted on upload and download.

Environment: MINIFT_VK_DEVICE picks the device (an index as `vulkaninfo --summary` numbers them, or a
name substring; GPUs before CPUs by default); MINIFT_VK_VALIDATION=1 runs the Khronos validation
layer; SPIR-V and pipelines are cached in ~/.cache/minift/vk ($MINIFT_CACHE_DIR/vk). No Vulkan
loader, no device, no GLSL compiler (glslangValidator or glslc on PATH) or a failed self-check: the
registry (runtime/device.py) falls back to NumPy with one warning.
"""
import struct, time, weakref
import numpy as np
from minift.codegen.gpu import assign_in_place_ok, rand_args, split_kernel
from minift.dtype import dtypes
from minift.helpers import DEBUG, KERNEL_DIR, log, prod
from minift.runtime.buffer import Buffer
from minift.runtime.device import Device
from minift.backends.vulkan import codegen as cg, vk


class _Launch:
  """A kernel's pipeline and how to dispatch it."""
  __slots__ = ("kernel", "rendered", "in_place_ok")

  def __init__(self, kernel, rendered, in_place_ok):
    self.kernel, self.rendered, self.in_place_ok = kernel, rendered, in_place_ok


class VulkanDevice(Device):
  name = "vulkan"

  def __init__(self, spec=None, **options):
    """spec: MINIFT_VK_DEVICE's form (None: read it); options go to vk.Device (validation,
    cache_dir, window, ... as the tests use them)."""
    if vk.find_compiler() is None:
      raise vk.VulkanUnavailable("no GLSL compiler: glslangValidator or glslc must be on PATH "
                                 "(Debian/Ubuntu: apt install glslc or glslang-tools; Termux: pkg install shaderc or glslang)")
    self.vk = vk.Device(spec, **options)
    caps = self.caps = self.vk.caps
    self.storage = cg.Storage.of(caps)
    self.target = cg.Target(storage=self.storage, window=self.vk.window, max_invocations=caps.max_workgroup_invocations,
                            max_size=caps.max_workgroup_size, max_groups=caps.max_workgroup_count,
                            shared_bytes=caps.max_shared_memory, subgroup=max(caps.subgroup_size, 1), is_cpu=caps.is_cpu)
    self.stats = self.vk.stats   # allocations, submits, dispatches, barriers, pipelines, pipeline_cache_hits
    self.cache_dir = self.vk.cache_dir
    self._launches = weakref.WeakKeyDictionary()   # schedule.Kernel -> {(input dtypes, pieces): _Launch}
    self._err = self.vk.alloc(4)                   # the gathers' and scatter-adds' index-out-of-range flag
    self._checks, self._checks_batch = [], None    # what the flag's pending value may name, and in which submit
    self.poison = False   # fill every new buffer with NaN bytes (tools/kernel_test.py: a kernel that writes nothing fails)
    self._self_check()
    if DEBUG >= 1: log.info(f"Vulkan device: {caps.name} ({caps.type}, {caps.driver_name or caps.vendor} {caps.driver_info or caps.driver_version})")

  def __repr__(self): return f"<VulkanDevice {self.caps.name!r}>"

  # ---- memory

  def _nbytes(self, size, dtype): return size * self.storage.np_dtype(dtype).itemsize

  def alloc(self, size, dtype):
    mem = self.vk.alloc(self._nbytes(size, dtype))
    if self.poison: self.vk.fill(mem, 0xFFFFFFFF)   # NaN as float32 and half, -1 as ints
    return Buffer(self, size, dtype, mem)

  def free(self, buf):
    mem, buf.data = buf.data, None
    try: self.vk.free(mem)
    except Exception: pass   # interpreter shutdown: the device may be closed already

  def _host(self, arr, dtype):
    """arr as the bytes a buffer of dtype holds on this device (Storage)."""
    arr = np.ascontiguousarray(np.asarray(arr, dtype=dtype.np)).reshape(-1)
    want = self.storage.np_dtype(dtype)
    if dtype is dtypes.int64 and want == np.int32 and arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
      raise OverflowError(f"Vulkan: {self.caps.name} has no 64-bit integers (shaderInt64), so int64 tensors hold 32-bit values; "
                          f"got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(want, copy=False)

  def from_numpy(self, arr, dtype):
    host = self._host(arr, dtype)
    buf = self.alloc(host.size, dtype)
    if host.size: self.vk.upload(buf.data, host)
    return buf

  def alloc_from(self, arr):
    arr = np.asarray(arr)
    return self.from_numpy(arr, dtypes.from_any(arr.dtype))

  def to_numpy(self, buf):
    host = self.vk.download(buf.data, self.storage.np_dtype(buf.dtype), buf.size)
    self._check_errors()
    if buf.dtype is dtypes.bool: return (host if host.dtype == np.uint8 else (host != 0).astype(np.uint8)).view(np.bool_)
    return host.astype(buf.dtype.np, copy=False)

  def copy_in(self, buf, arr):
    host = self._host(arr, buf.dtype)
    if host.size: self.vk.upload(buf.data, host)

  def page_out(self, buf):
    self.free(buf)

  def page_in(self, buf, arr):
    buf.data = self.vk.alloc(self._nbytes(buf.size, buf.dtype))
    self.copy_in(buf, arr)

  # ---- submitting

  def submit(self):
    """Submit what the schedule recorded, wait for it, and raise an index error it found."""
    self.vk.flush()
    self._check_errors()

  synchronize = submit

  def synchronize_time(self, start):
    """Seconds the last kernel took: its timestamps when DEBUG>=2 turned them on, else wall time since `start`."""
    self.submit()
    if self.vk.profiling and self.vk.timings: return sum(t for _, t in self.vk.timings)
    return time.perf_counter() - start

  def _check_slot(self, kernel, ins):
    """The check number a gather or scatter-add sets the error flag to; the flag is cleared once per submit."""
    if self._checks and self.stats["submits"] != self._checks_batch: self._check_errors()
    if not self._checks:
      self.vk.fill(self._err, 0)
      self._checks_batch = self.stats["submits"]
    self._checks.append((kernel, ins))
    return len(self._checks)

  def _check_errors(self):
    if not self._checks or self.stats["submits"] == self._checks_batch: return   # nothing, or not run yet
    checks, self._checks = self._checks, []
    flag = int(self.vk.download(self._err, np.int32, 1)[0])
    if not flag: return
    kernel, ins = checks[flag - 1]
    table_node, idx_node = kernel.ast.srcs[:2]
    idx = self.to_numpy(ins[idx_node.arg.input])
    if kernel.kind == "gather":
      raise IndexError(f"embedding index out of range: indices span [{idx.min()}, {idx.max()}] but the table has {table_node.arg.view.shape[0]} rows")
    raise IndexError(f"scatter-add index out of range: indices span [{idx.min()}, {idx.max()}] for {kernel.shape[0]} rows")

  # ---- building

  def _pieces(self, nbytes): return self.vk.bindings_for(nbytes)

  def _binding_plan(self, kernel, in_dtypes, in_sizes):
    """(pieces of the output and of each input, bindings in all)."""
    pieces = (self._pieces(self._nbytes(prod(kernel.shape), kernel.dtype)),) + tuple(
      self._pieces(self._nbytes(n, d)) for n, d in zip(in_sizes, in_dtypes))
    return pieces, sum(pieces) + (1 if kernel.kind in ("gather", "scatter_add") else 0)

  def _render(self, kernel, in_dtypes, in_sizes, pieces):
    rendered = cg.render(kernel, in_dtypes, in_sizes, pieces, self.target)
    if DEBUG >= 4: print(f"----- {rendered.name} groups={rendered.groups}\n{rendered.src}")
    return rendered

  def _launch_of(self, kernel, in_dtypes, in_sizes, pieces, rendered=None):
    launches = self._launches.get(kernel)
    if launches is None: launches = self._launches[kernel] = {}
    launch = launches.get((in_dtypes, pieces))
    if launch is None:
      rendered = rendered or self._render(kernel, in_dtypes, in_sizes, pieces)
      nbindings = sum(pieces) + (1 if "check" in rendered.push else 0)
      pipeline = self.vk.kernel(rendered.name, rendered.src, nbindings, 4 * len(rendered.push))
      launch = launches[(in_dtypes, pieces)] = _Launch(pipeline, rendered, kernel.assign_target is None or assign_in_place_ok(kernel))
    return launch

  def prepare(self, kernels):
    """Render the schedule's kernels that are new and compile them all at once (in parallel)."""
    todo = []
    for k in kernels:
      in_dtypes, in_sizes = tuple(i.dtype for i in k.inputs), tuple(prod(i.shape) for i in k.inputs)
      pieces, nbindings = self._binding_plan(k, in_dtypes, in_sizes)
      if prod(k.shape) == 0 or nbindings > self.caps.max_storage_buffers: continue   # run() splits those
      launches = self._launches.get(k)
      if launches is not None and (in_dtypes, pieces) in launches: continue
      todo.append((k, in_dtypes, in_sizes, pieces, self._render(k, in_dtypes, in_sizes, pieces)))
    if not todo: return
    self.vk.precompile([(r.name, r.src) for *_, r in todo])
    for k, in_dtypes, in_sizes, pieces, r in todo: self._launch_of(k, in_dtypes, in_sizes, pieces, r)

  # ---- running

  def run(self, kernel, ins, assign_out=None, rand_key=None):
    ins = [b if b.device is self else self.from_numpy(b.device.to_numpy(b), b.dtype) for b in ins]   # copies in
    n = prod(kernel.shape)
    if n == 0: return assign_out if assign_out is not None else self.alloc(0, kernel.dtype)
    in_dtypes, in_sizes = tuple(b.dtype for b in ins), tuple(b.size for b in ins)
    pieces, nbindings = self._binding_plan(kernel, in_dtypes, in_sizes)
    if nbindings > self.caps.max_storage_buffers:
      kernel, ins = self._split(kernel, ins, self.caps.max_storage_buffers - (nbindings - sum(pieces[1:])))
      in_dtypes, in_sizes = tuple(b.dtype for b in ins), tuple(b.size for b in ins)
      pieces, nbindings = self._binding_plan(kernel, in_dtypes, in_sizes)
    launch = self._launch_of(kernel, in_dtypes, in_sizes, pieces)
    r = launch.rendered
    in_place = assign_out is not None and launch.in_place_ok
    out = assign_out if in_place else self.alloc(n, kernel.dtype)
    bindings, push = [out.data] + [b.data for b in ins], {}
    if "key" in r.push: push["key"], push["counter"] = (int(v) for v in rand_args(*rand_key))
    if "check" in r.push:
      push["check"] = self._check_slot(kernel, ins)
      bindings.append(self._err)
    if r.notes.get("zero_fill"): self.vk.fill(out.data, 0)
    if "fill_from" in r.notes and ins[r.notes["fill_from"]] is not out:   # out itself: scattered in place (jit._donated)
      self.vk.copy(out.data, ins[r.notes["fill_from"]].data)
    writes = (0, len(bindings) - 1) if "check" in r.push else (0,)
    self.vk.dispatch(launch.kernel, r.groups, bindings, struct.pack(f"<{len(r.push)}I", *[push[p] for p in r.push]), writes=writes, name=kernel.name)
    if assign_out is not None and not in_place:   # the kernel read the target: write it afterwards
      self.vk.copy(assign_out.data, out.data)
      return assign_out
    return out

  def _split(self, kernel, ins, limit):
    """A kernel binding more storage buffers than the device allows (a cat of many tensors, or
    inputs in many pieces): run subtrees of its AST as kernels of their own until the rest fits."""
    done = split_kernel(kernel, ins, limit, self.run, weight=lambda b: len(b.data.pieces))
    if done is None:
      raise RuntimeError(f"Vulkan: kernel {kernel.name} binds {sum(len(b.data.pieces) for b in ins)} storage buffers for its inputs, "
                         f"more than {self.caps.name} allows ({limit} besides its output), and cannot be split")
    return done

  # ---- self-check

  def _self_check(self):
    """A tiny kernel against NumPy, through the same compile path (and disk cache) as the rest."""
    if not (KERNEL_DIR / "matmul.comp").exists(): raise RuntimeError(f"Vulkan: {KERNEL_DIR / 'matmul.comp'} is missing (reinstall minift: its kernels/ was not installed)")
    h_type = "float16_t" if self.storage.half16 else "float"
    src = (self.storage.head() + "layout(local_size_x = 16) in;\n"
           "layout(std430, binding = 0) writeonly buffer O { float o[]; };\n"
           "layout(std430, binding = 1) readonly buffer A { float a[]; };\n"
           f"layout(std430, binding = 2) readonly buffer H {{ {h_type} h[]; }};\n"
           "void main() { uint i = gl_GlobalInvocationID.x; o[i] = a[i] * 2.0f + float(h[i]); }\n")
    kernel = self.vk.kernel("minift_self_check", src, 3)
    a = np.linspace(-2, 2, 16, dtype=np.float32)
    h = np.linspace(0, 1, 16, dtype=np.float16)
    ba, bh, out = self.from_numpy(a, dtypes.float32), self.from_numpy(h, dtypes.float16), self.alloc(16, dtypes.float32)
    self.vk.dispatch(kernel, (1,), [out.data, ba.data, bh.data])
    got, want = self.to_numpy(out), a * 2 + h.astype(np.float32)
    if not np.allclose(got, want, atol=1e-6):
      raise RuntimeError(f"Vulkan self-check failed on {self.caps.name}: max error {np.abs(got - want).max()}")
