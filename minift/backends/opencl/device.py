"""The OpenCL backend: runs the scheduler's kernels on an OpenCL device (phone GPUs; PoCL in CI).

Each kernel is rendered to OpenCL C (codegen.py; matmuls use kernels/matmul.cl),
built once per process and once per machine (program binaries cached on disk), and launched on
one in-order queue. Buffers are cl.Buffers, recycled through a freed-buffer cache keyed by size.

Environment: MINIFT_CL_DEVICE picks the device ("platform:device" indices or a name substring;
GPUs before CPUs by default); the binary cache is ~/.cache/minift/cl ($MINIFT_CACHE_DIR/cl).
Any failure here (no pyopencl, no platform, a failed self-check) makes the registry (runtime/device.py) fall back to
NumPy with one warning.
"""
import hashlib, os, re, time, weakref
from dataclasses import dataclass, asdict
from pathlib import Path
import numpy as np
import pyopencl as cl
from minift.dtype import dtypes
from minift.helpers import DEBUG, KERNEL_DIR, log, prod, prune_cache, touch_cache
from minift.lazy import LazyOp, Op
from minift.runtime.buffer import Buffer
from minift.runtime.device import Device
from minift.schedule import Kernel, KNode, LoadArg
from minift.view import View
from minift.backends.opencl import codegen as cg

BUILD_OPTIONS = ""   # no fast-math: results must match the NumPy backend


class CLBuildError(RuntimeError):
  """An OpenCL program failed to build; carries the kernel name, the build log and the source."""

  def __init__(self, kernel_name, build_log, src):
    super().__init__(f"OpenCL build of kernel {kernel_name!r} failed:\n{build_log}")
    self.kernel_name, self.build_log, self.src = kernel_name, build_log, src


@dataclass
class DeviceCaps:
  """What the device says about itself (query, do not assume)."""
  platform: str
  name: str
  vendor: str
  type: str
  version: str
  driver_version: str
  opencl_c_version: str
  compute_units: int
  clock_mhz: int
  max_work_group_size: int
  max_work_item_sizes: tuple
  local_mem_size: int
  max_mem_alloc_size: int
  global_mem_size: int
  max_parameter_size: int
  address_bits: int
  fp16: bool              # cl_khr_fp16 in the extension list: half arithmetic allowed
  image_support: bool
  image2d_max: tuple      # (width, height) in pixels
  extensions: str

  @property
  def is_cpu(self): return self.type == "CPU"

  @property
  def max_buffers(self):
    """Input buffers a kernel may take: the parameter space, less out and an extra argument."""
    return self.max_parameter_size // (self.address_bits // 8) - 2

  @staticmethod
  def query(platform, device):
    exts = device.extensions
    return DeviceCaps(
      platform=platform.name.strip(), name=device.name.strip(), vendor=device.vendor.strip(),
      type=device_type_name(device), version=device.version.strip(),
      driver_version=device.driver_version.strip(), opencl_c_version=device.opencl_c_version.strip(),
      compute_units=device.max_compute_units, clock_mhz=device.max_clock_frequency,
      max_work_group_size=device.max_work_group_size, max_work_item_sizes=tuple(device.max_work_item_sizes),
      local_mem_size=device.local_mem_size, max_mem_alloc_size=device.max_mem_alloc_size,
      global_mem_size=device.global_mem_size, max_parameter_size=device.max_parameter_size, address_bits=device.address_bits,
      fp16="cl_khr_fp16" in exts.split(), image_support=bool(device.image_support),
      image2d_max=(device.image2d_max_width, device.image2d_max_height) if device.image_support else (0, 0),
      extensions=exts.strip())

  def as_dict(self):
    d = asdict(self)
    d["is_cpu"] = self.is_cpu
    return d


def device_type_name(device):
  t = device.type   # a bit field (pyopencl's to_string also names the ALL mask)
  return "GPU" if t & cl.device_type.GPU else "CPU" if t & cl.device_type.CPU else "ACCELERATOR" if t & cl.device_type.ACCELERATOR else "OTHER"


def list_devices():
  """[(platform index, device index, platform, device)] of every OpenCL device here."""
  out = []
  for pi, platform in enumerate(cl.get_platforms()):
    try: devices = platform.get_devices()
    except cl.Error: continue   # a platform with no devices raises DEVICE_NOT_FOUND
    out += [(pi, di, platform, d) for di, d in enumerate(devices)]
  return out


def select_device(spec=""):
  """The (platform, device) MINIFT_CL_DEVICE names ('P:D' or a name substring), else the
  first GPU, else the first device of any kind."""
  found = list_devices()
  if not found: raise RuntimeError("no OpenCL platform or device found")
  if spec:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
    if m: hits = [f for f in found if (f[0], f[1]) == (int(m[1]), int(m[2]))]
    else: hits = [f for f in found if spec.lower() in f"{f[2].name} {f[3].name}".lower()]
    if not hits:
      names = "; ".join(f"{pi}:{di} {p.name.strip()} / {d.name.strip()}" for pi, di, p, d in found)
      raise RuntimeError(f"MINIFT_CL_DEVICE={spec!r} names no OpenCL device (have: {names})")
    return hits[0][2], hits[0][3]
  gpus = [f for f in found if f[3].type & cl.device_type.GPU]
  pick = (gpus or found)[0]
  return pick[2], pick[3]


def default_cache_dir():
  env = os.environ.get("MINIFT_CACHE_DIR")   # the cache root, shared with the C loops (c/ beside cl/)
  return Path(env) / "cl" if env else Path.home() / ".cache" / "minift" / "cl"


_UNTRIED = object()   # _Launch.image_launch before the image variant was tried


class _Launch:
  """A built kernel and how to launch it. image_weight: (input index, N, K) when a matmul could
  read its B operand from an image2d; image_launch: that variant (built on first use; None when
  no tile of it fits)."""
  __slots__ = ("clk", "rendered", "global_size", "local_size", "in_place_ok", "image_weight", "image_launch")

  def __init__(self, clk, rendered, in_place_ok, image_weight=None):
    self.clk, self.rendered, self.in_place_ok = clk, rendered, in_place_ok
    self.global_size, self.local_size = rendered.global_size, rendered.local_size
    self.image_weight, self.image_launch = image_weight, _UNTRIED


class OpenCLDevice(Device):
  name = "opencl"
  quantized_types = frozenset(d.name for d in dtypes.quantized())   # read through kernels/dequant.h (codegen.with_dequant)

  def __init__(self, spec=None):
    self.platform, self.device = select_device(os.environ.get("MINIFT_CL_DEVICE", "") if spec is None else spec)
    self.caps = DeviceCaps.query(self.platform, self.device)
    self.ctx = cl.Context([self.device])
    self.profiling = DEBUG >= 2
    props = cl.command_queue_properties.PROFILING_ENABLE if self.profiling else 0
    self.queue = cl.CommandQueue(self.ctx, self.device, properties=props)   # in-order
    self.cache_dir = default_cache_dir()
    self.stats = {"built": 0, "cache_hits": 0, "launches": 0}   # programs compiled from source / loaded from disk
    self._programs = {}                           # source hash -> cl.Program
    self._kernels = {}                            # (source hash, name) -> (cl.Kernel, work-group limit)
    self._launches = weakref.WeakKeyDictionary()  # schedule.Kernel -> {input dtypes: _Launch}
    self._free, self._free_bytes = {}, 0          # freed-buffer cache: nbytes -> [cl.Buffer]
    self._free_limit = self.caps.global_mem_size // 4
    self._events = []                             # events of the last run (DEBUG=2 timing)
    self._err = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, 4)   # index-out-of-range flag
    # matmul weights read through the texture cache (Adreno's fast path for read-only data): a
    # buffer used twice as x @ W.T's W gets an image2d copy, dropped when the buffer is written
    self.use_images = self.caps.image_support and "qualcomm" in self.caps.vendor.lower()
    self._images, self._weight_uses = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
    self._cache_warned = False
    self._self_check()
    if DEBUG >= 1: log.info(f"OpenCL device: {self.caps.name} ({self.caps.platform}, driver {self.caps.driver_version})")

  def __repr__(self): return f"<OpenCLDevice {self.caps.name!r}>"

  # ---- memory

  def _alloc(self, nbytes):
    nbytes = max(int(nbytes), 1)
    if nbytes > self.caps.max_mem_alloc_size:
      raise MemoryError(f"OpenCL: a buffer of {nbytes / 2**20:.1f} MiB exceeds the device's largest single allocation "
                        f"({self.caps.max_mem_alloc_size / 2**20:.0f} MiB on {self.caps.name}); shard the tensor")
    cached = self._free.get(nbytes)
    if cached:
      self._free_bytes -= nbytes
      return cached.pop()
    try:
      return cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, nbytes)
    except (cl.Error, MemoryError):   # out of device memory: give back what the cache holds, retry once
      self.empty_cache()
      return cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, nbytes)

  def empty_cache(self):
    self._free, self._free_bytes = {}, 0

  def alloc(self, size, dtype):
    return Buffer(self, size, dtype, self._alloc(dtype.nbytes(size)))

  def free(self, buf):
    mem, buf.data = buf.data, None
    try:
      if self._free_bytes + mem.size > self._free_limit: return   # let the driver have it back
      self._free.setdefault(mem.size, []).append(mem)
      self._free_bytes += mem.size
    except Exception:   # interpreter shutdown: the context may be gone already
      pass

  def from_numpy(self, arr, dtype):
    arr = np.ascontiguousarray(np.asarray(arr, dtype=dtype.np)).reshape(-1)
    buf = self.alloc(arr.size // dtype.itemsize * dtype.block if dtype.is_quantized else arr.size, dtype)   # quantized: arr is the blocks' bytes
    if arr.size: cl.enqueue_copy(self.queue, buf.data, arr, is_blocking=True)
    return buf

  def alloc_from(self, arr):
    arr = np.asarray(arr)
    return self.from_numpy(arr, dtypes.from_any(arr.dtype))

  def to_numpy(self, buf):
    host = np.empty(buf.nbytes if buf.dtype.is_quantized else buf.size, np.uint8 if buf.dtype is dtypes.bool else buf.dtype.np)
    if buf.size: cl.enqueue_copy(self.queue, host, buf.data, is_blocking=True)
    return host.view(np.bool_) if buf.dtype is dtypes.bool else host

  def copy_in(self, buf, arr):
    self.forget_copies(buf)
    arr = np.ascontiguousarray(np.asarray(arr, dtype=buf.dtype.np)).reshape(-1)
    if arr.size: cl.enqueue_copy(self.queue, buf.data, arr, is_blocking=True)

  def weight_image(self, buf, rows, cols):
    """An image2d copy of a (rows, cols) row-major float32 or float16 buffer: rows of cols/4
    RGBA pixels (float or half channels), as kernels/matmul_image.cl reads it."""
    if cols % 4 or buf.dtype not in (dtypes.float32, dtypes.float16): raise ValueError(f"no image layout for a {buf.dtype.name} ({rows}, {cols}) weight")
    kind = cl.channel_type.FLOAT if buf.dtype is dtypes.float32 else cl.channel_type.HALF_FLOAT
    image = cl.create_image(self.ctx, cl.mem_flags.READ_ONLY, cl.ImageFormat(cl.channel_order.RGBA, kind), shape=(cols // 4, rows))
    cl.enqueue_copy(self.queue, image, buf.data, offset=0, origin=(0, 0), region=(cols // 4, rows))
    return image

  def _image_for(self, buf, rows, cols):
    image = self._images.get(buf)
    if image is None:
      uses = self._weight_uses[buf] = self._weight_uses.get(buf, 0) + 1
      if uses < 2: return None   # activations are used once: only weights earn an image
      image = self._images[buf] = self.weight_image(buf, rows, cols)
    return image

  def forget_copies(self, buf):
    self._images.pop(buf, None)
    self._weight_uses.pop(buf, None)

  def is_writable(self, buf): return True   # device memory is always a copy, never a read-only mapping

  def synchronize(self):
    self.queue.finish()

  def synchronize_time(self, start):
    """Seconds the last run took: device time from profiling events when DEBUG>=2 turned
    profiling on, else wall time since `start` after waiting for the queue."""
    self.queue.finish()
    if self.profiling and self._events:
      return sum(e.profile.end - e.profile.start for e in self._events) * 1e-9
    return time.perf_counter() - start

  # ---- building

  def build(self, name, src):
    """A cl.Program for `src`: from memory, else from the disk cache (keyed by the source,
    device name and driver version), else compiled and then cached."""
    key = hashlib.sha256("\0".join([src, BUILD_OPTIONS, self.caps.platform, self.caps.name, self.caps.version,
                                    self.caps.driver_version]).encode()).hexdigest()
    prg = self._programs.get(key)
    if prg is not None: return prg, key
    path = self.cache_dir / f"{key[:40]}.bin"
    if path.exists():
      try:
        prg = cl.Program(self.ctx, [self.device], [path.read_bytes()]).build(BUILD_OPTIONS)
        self.stats["cache_hits"] += 1
        touch_cache(path)
      except (cl.Error, OSError):   # a stale or truncated binary: rebuild from source
        prg = None
    if prg is None:
      if DEBUG >= 3: log.info(f"OpenCL: compiling {name}")
      try:
        prg = cl.Program(self.ctx, src).build(BUILD_OPTIONS)
      except cl.Error as e:
        raise CLBuildError(name, str(e), src) from None
      self.stats["built"] += 1
      self._save_binary(path, prg)
    self._programs[key] = prg
    return prg, key

  def _save_binary(self, path, prg):
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp")
      tmp.write_bytes(prg.binaries[0])
      os.replace(tmp, path)   # atomic: a concurrent process never reads half a file
      prune_cache(path.parent, "*.bin")
    except OSError as e:
      if not self._cache_warned:
        self._cache_warned = True
        log.warning(f"OpenCL: cannot write the kernel cache at {path.parent} ({e}); kernels will compile every run")

  def kernel(self, name, src):
    """(cl.Kernel, its CL_KERNEL_WORK_GROUP_SIZE)."""
    prg, key = self.build(name, src)
    found = self._kernels.get((key, name))
    if found is None:
      clk = cl.Kernel(prg, name)
      limit = clk.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device)
      found = self._kernels[(key, name)] = (clk, limit)
    return found

  def _max_local(self, limit=None):
    m = min(self.caps.max_work_group_size, self.caps.max_work_item_sizes[0])
    return min(m, limit) if limit else m

  def _launch_of(self, kernel, in_dtypes, in_sizes):
    launches = self._launches.get(kernel)
    if launches is None: launches = self._launches[kernel] = {}
    launch = launches.get(in_dtypes)
    if launch is None: launch = launches[in_dtypes] = self._build_launch(kernel, in_dtypes, in_sizes)
    return launch

  def _build_launch(self, kernel, in_dtypes, in_sizes):
    if kernel.kind == "matmul":
      configs = cg.matmul_configs(kernel, self.caps)
      for config in configs:   # the first whose work-group this kernel can launch
        rendered = cg.render(kernel, in_dtypes, in_sizes, self.caps, config=config)
        clk, limit = self._kernel_for(rendered)
        if prod(rendered.local_size) <= limit: break
      else:
        raise RuntimeError(f"OpenCL: no matmul tile fits {kernel.name} on {self.caps.name} (work-group limit {limit})")
    else:
      rendered = cg.render(kernel, in_dtypes, in_sizes, self.caps, max_local=self._max_local())
      clk, limit = self._kernel_for(rendered)
      if prod(rendered.local_size) > limit:   # this kernel allows less than the device: re-render smaller
        rendered = cg.render(kernel, in_dtypes, in_sizes, self.caps, max_local=self._max_local(limit))
        clk, limit = self._kernel_for(rendered)
    in_place = kernel.assign_target is None or cg.assign_in_place_ok(kernel)
    image = cg.image_weight(kernel, in_sizes, self.caps) if kernel.kind == "matmul" and not any(d.is_quantized for d in in_dtypes) else None
    return _Launch(clk, rendered, in_place, image)

  def _image_launch(self, kernel, in_dtypes, in_sizes):
    for config in cg.matmul_configs(kernel, self.caps):
      rendered = cg.render_matmul(kernel, in_dtypes, cg.index_type(kernel, in_sizes), config, image=True)
      clk, limit = self._kernel_for(rendered)
      if prod(rendered.local_size) <= limit: return _Launch(clk, rendered, True)
    return None

  def _kernel_for(self, rendered):
    if DEBUG >= 4: print(f"----- {rendered.name} global={rendered.global_size} local={rendered.local_size}\n{rendered.src}")
    return self.kernel(rendered.name, rendered.src)

  # ---- running

  def _launch(self, clk, global_size, local_size, args):
    evt = clk(self.queue, global_size, local_size, *args)
    self.stats["launches"] += 1
    if self.profiling: self._events.append(evt)
    return evt

  def run(self, kernel, ins, assign_out=None, rand_key=None):
    self._events = []
    ins = [b if b.device is self else self.from_numpy(b.device.to_numpy(b), b.dtype) for b in ins]   # copies in
    if len(ins) > self.caps.max_buffers: kernel, ins = self._split(kernel, ins)
    n = prod(kernel.shape)
    if n == 0: return assign_out if assign_out is not None else self.alloc(0, kernel.dtype)
    in_dtypes, in_sizes = tuple(b.dtype for b in ins), tuple(b.size for b in ins)
    launch = self._launch_of(kernel, in_dtypes, in_sizes)
    if assign_out is not None: self.forget_copies(assign_out)
    in_place = assign_out is not None and launch.in_place_ok
    out = assign_out if in_place else self.alloc(n, kernel.dtype)
    args = [out.data] + [b.data for b in ins]
    if launch.image_weight is not None and self.use_images:
      w, rows, cols = launch.image_weight
      image = self._image_for(ins[w], rows, cols)
      if image is not None:
        if launch.image_launch is _UNTRIED: launch.image_launch = self._image_launch(kernel, in_dtypes, in_sizes)
        if launch.image_launch is not None:
          launch = launch.image_launch
          args.append(image)
    extra = launch.rendered.extra_args
    if "key" in extra: args += list(cg.rand_args(*rand_key))
    if "err" in extra:
      cl.enqueue_fill_buffer(self.queue, self._err, np.int32(0), 0, 4)
      args.append(self._err)
    if launch.rendered.notes.get("zero_fill"): cl.enqueue_fill_buffer(self.queue, out.data, np.uint8(0), 0, out.nbytes)
    onto = ins[launch.rendered.notes["fill_from"]] if "fill_from" in launch.rendered.notes else out   # out itself: scattered in place (jit._donated)
    if onto is not out: cl.enqueue_copy(self.queue, out.data, onto.data, byte_count=out.nbytes)
    self._launch(launch.clk, launch.global_size, launch.local_size, args)
    if "err" in extra: self._check_index_error(kernel, ins)
    if assign_out is not None and not in_place:   # the kernel read the target: write it afterwards
      cl.enqueue_copy(self.queue, assign_out.data, out.data, byte_count=out.nbytes)
      return assign_out
    return out

  def _split(self, kernel, ins):
    """A kernel with more input buffers than the device takes (a cat of many tensors): run
    subtrees of its AST as kernels of their own until the rest fits."""
    limit = self.caps.max_buffers
    while len(ins) > limit:
      best = _largest_subtree(kernel, limit)
      if best is None: raise RuntimeError(f"OpenCL: kernel {kernel.name} reads {len(ins)} buffers, more than {self.caps.name} takes ({limit}), and cannot be split")
      node, shape = best
      sub, sub_ins = _rebuild(node, ins, shape, node.dtype, kernel.device)
      part = self.run(sub, sub_ins)
      load = KNode(Op.BUFFER, (), LoadArg(len(ins), View.contiguous(shape)), node.dtype)
      kernel, ins = _rebuild(kernel.ast, ins + [part], kernel.shape, kernel.dtype, kernel.device, {id(node): load}, kernel.assign_target)
    return kernel, ins

  def _check_index_error(self, kernel, ins):
    flag = np.zeros(1, np.int32)
    cl.enqueue_copy(self.queue, flag, self._err, is_blocking=True)
    if not flag[0]: return
    table_node, idx_node = kernel.ast.srcs
    idx = self.to_numpy(ins[idx_node.arg.input])
    if kernel.kind == "gather":
      raise IndexError(f"embedding index out of range: indices span [{idx.min()}, {idx.max()}] but the table has {table_node.arg.view.shape[0]} rows")
    raise IndexError(f"scatter-add index out of range: indices span [{idx.min()}, {idx.max()}] for {kernel.shape[0]} rows")

  # ---- self-check

  def _self_check(self):
    """A tiny kernel against NumPy, through the same build path (and disk cache) as the rest."""
    for name in ("matmul.cl", "matmul_image.cl"):   # the hand kernels live in the repository's kernels/
      if not (KERNEL_DIR / name).exists(): raise RuntimeError(f"OpenCL: {KERNEL_DIR / name} is missing (reinstall minift: its kernels/ was not installed)")
    src = ("__kernel void minift_self_check(__global float* out, __global const float* a, __global const half* h) {\n"
           "  int i = get_global_id(0);\n  out[i] = a[i] * 2.0f + vload_half(i, h);\n}\n")
    clk, _ = self.kernel("minift_self_check", src)
    a = np.linspace(-2, 2, 16, dtype=np.float32)
    h = np.linspace(0, 1, 16, dtype=np.float16)
    ba, bh = self.from_numpy(a, dtypes.float32), self.from_numpy(h, dtypes.float16)
    out = self.alloc(16, dtypes.float32)
    clk(self.queue, (16,), None, out.data, ba.data, bh.data)
    got = self.to_numpy(out)
    want = a * 2 + h.astype(np.float32)
    if not np.allclose(got, want, atol=1e-6):
      raise RuntimeError(f"OpenCL self-check failed on {self.caps.name}: max error {np.abs(got - want).max()}")


# ---- splitting a kernel that reads too many buffers

def _loads(node, memo=None):
  """The set of input indices a subtree reads."""
  memo = {} if memo is None else memo
  if id(node) not in memo:
    memo[id(node)] = {node.arg.input} if node.op is Op.BUFFER else set().union(*[_loads(s, memo) for s in node.srcs])
  return memo[id(node)]


def _largest_subtree(kernel, limit):
  """(node, shape it is computed in) of the elementwise subtree reading the most buffers, at
  most limit; None when there is none with two or more."""
  best, memo, seen = None, {}, set()
  reduce_shape = kernel.reduce.arg.shape if kernel.reduce is not None else None
  stack = [(kernel.ast, kernel.shape)]
  while stack:
    node, shape = stack.pop()
    if id(node) in seen: continue
    seen.add(id(node))
    if node.op in (Op.GATHER, Op.SCATTER_ADD, Op.RAND, Op.COPY, Op.BUFFER, Op.CONST): continue
    if node.op in (Op.SUM, Op.RMAX):
      if not node.arg.matmul: stack.append((node.srcs[0], reduce_shape))   # a matmul's operands are loads
      continue
    n = len(_loads(node, memo))
    if node is not kernel.ast and 2 <= n <= limit and (best is None or n > best[0]): best = (n, node, shape)
    stack.extend((s, shape) for s in node.srcs)
  return None if best is None else best[1:]


def _rebuild(ast, ins, shape, dtype, device, replace=None, assign_target=None):
  """A Kernel computing `ast` (with nodes swapped per `replace`) over just the buffers it reads."""
  replace, used = dict(replace or {}), {}
  def copy(node):
    if id(node) in replace: node = replace[id(node)]
    if node.op is Op.BUFFER:
      i, view = node.arg
      return KNode(Op.BUFFER, (), LoadArg(used.setdefault(i, len(used)), view), node.dtype)
    new = KNode(node.op, tuple(copy_memo(s) for s in node.srcs), node.arg, node.dtype)
    return new
  memo = {}
  def copy_memo(node):   # keeps the DAG: a node used twice stays one node
    if id(node) not in memo: memo[id(node)] = copy(node)
    return memo[id(node)]
  new_ast = copy_memo(ast)
  order = sorted(used, key=used.get)
  target = used.get(assign_target) if assign_target is not None else None
  out = LazyOp(Op.CONTIGUOUS, (), None, shape, dtype, device)
  return Kernel(out, [None] * len(order), new_ast, target), [ins[i] for i in order]
