"""The OpenCL backend: runs the scheduler's kernels on an OpenCL device (phone GPUs; PoCL in CI).

Each kernel is rendered to OpenCL C (codegen.py; matmuls use kernels/matmul.cl),
built once per process and once per machine (program binaries cached on disk), and launched on
one in-order queue. Buffers are cl.Buffers, recycled through a freed-buffer cache keyed by size.

Matmul tiles come from codegen/tiles.py, the biggest that the device's and the built kernel's
limits allow; when the driver refuses one (a failed build, CL_OUT_OF_RESOURCES at launch) the next
smaller one runs, and the refusal is kept in tiles.json in the cache so later starts skip it.

Environment: MINIFT_CL_DEVICE picks the device ("platform:device" indices or a name substring;
GPUs before CPUs by default); the binary cache is ~/.cache/minift/cl ($MINIFT_CACHE_DIR/cl).
Any failure here (no pyopencl, no platform, a failed self-check) makes the registry (runtime/device.py) fall back to
NumPy with one warning.
"""
import hashlib, json, os, re, time, weakref
from dataclasses import dataclass, asdict
from pathlib import Path
import numpy as np
import pyopencl as cl
from minift.dtype import dtypes
from minift.helpers import DEBUG, KERNEL_DIR, log, prod, prune_cache, read_kernel, touch_cache, write_cache_file
from minift.lazy import LazyOp, Op
from minift.runtime.buffer import Buffer
from minift.runtime.device import Device
from minift.codegen.gpu import split_kernel
from minift.backends.opencl import codegen as cg
from minift.codegen import tiles

BUILD_OPTIONS = ""   # no fast-math: results must match the NumPy backend
# launch errors that mean "this work-group is too big for this kernel here" (registers ran out):
# the launch is retried with a smaller work-group
REFUSED_LAUNCH = {cl.status_code.OUT_OF_RESOURCES: "CL_OUT_OF_RESOURCES", cl.status_code.INVALID_WORK_GROUP_SIZE: "CL_INVALID_WORK_GROUP_SIZE"}


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
  single_fp_config: tuple = ()            # CL_DEVICE_SINGLE_FP_CONFIG flags: DENORM, INF_NAN, FMA, ROUND_TO_NEAREST, ...
  image_formats: tuple = ()               # "ORDER/TYPE" of every read-only image2d format, e.g. "RGBA/HALF_FLOAT"
  preferred_work_group_multiple: int = 0  # CL_KERNEL_PREFERRED_WORK_GROUP_SIZE_MULTIPLE of a simple kernel (the self-check's)

  @property
  def denormals(self):
    """Whether float32 denormals are kept (phone GPUs often flush them to zero)."""
    return "DENORM" in self.single_fp_config

  @property
  def is_cpu(self): return self.type == "CPU"

  @property
  def max_buffers(self):
    """Input buffers a kernel may take: the parameter space, less out and an extra argument."""
    return self.max_parameter_size // (self.address_bits // 8) - 2

  @staticmethod
  def query(platform, device, ctx=None):
    exts = device.extensions
    fp = device.single_fp_config
    formats = ()
    if device.image_support:
      found = cl.get_supported_image_formats(ctx or cl.Context([device]), cl.mem_flags.READ_ONLY, cl.mem_object_type.IMAGE2D)
      formats = tuple(sorted({f"{_name(cl.channel_order, f.channel_order)}/{_name(cl.channel_type, f.channel_data_type)}" for f in found}))
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
      extensions=exts.strip(), image_formats=formats,
      single_fp_config=tuple(n for n in dir(cl.device_fp_config) if n.isupper() and fp & getattr(cl.device_fp_config, n)))

  def as_dict(self):
    d = asdict(self)
    d["is_cpu"], d["denormals"] = self.is_cpu, self.denormals
    return d


def _name(kind, value):
  """pyopencl's name of a constant, or its number where pyopencl has none (vendor formats)."""
  try: return kind.to_string(value)
  except ValueError: return hex(value)


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
    self.ctx = cl.Context([self.device])
    self.caps = DeviceCaps.query(self.platform, self.device, self.ctx)
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
    self._refused = None   # {kernel family: {tile: reason}} the driver refused (see refused_tiles)
    self.poison = False    # fill every new buffer with NaN bytes (tools/kernel_test.py: a kernel that writes nothing fails)
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
    mem = self._alloc(dtype.nbytes(size))
    if self.poison: cl.enqueue_fill_buffer(self.queue, mem, np.uint8(0xFF), 0, mem.size)   # NaN as float32 and half, -1 as ints
    return Buffer(self, size, dtype, mem)

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
      if f"RGBA/{'HALF_FLOAT' if buf.dtype is dtypes.float16 else 'FLOAT'}" not in self.caps.image_formats: return None
      uses = self._weight_uses[buf] = self._weight_uses.get(buf, 0) + 1
      if uses < 2: return None   # activations are used once: only weights earn an image
      image = self._images[buf] = self.weight_image(buf, rows, cols)
    return image

  def page_out(self, buf):
    self.forget_copies(buf)   # drop a texture copy of it too
    mem, buf.data = buf.data, None
    mem.release()             # to the driver, not the freed-buffer cache: the pager's budget is real memory

  def page_in(self, buf, arr):
    buf.data = self._alloc(buf.nbytes)
    self.copy_in(buf, arr)

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
      write_cache_file(path, prg.binaries[0])
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

  def _build_launch(self, kernel, in_dtypes, in_sizes, max_local=None):
    if kernel.kind == "matmul":
      rendered, clk = self._matmul_tile(kernel, lambda config: cg.render(kernel, in_dtypes, in_sizes, self.caps, config=config))
    else:
      rendered = cg.render(kernel, in_dtypes, in_sizes, self.caps, max_local=self._max_local(max_local))
      clk, limit = self._kernel_for(rendered)
      if prod(rendered.local_size) > limit:   # this kernel allows less than the device: re-render smaller
        rendered = cg.render(kernel, in_dtypes, in_sizes, self.caps, max_local=self._max_local(min(limit, max_local or limit)))
        clk, limit = self._kernel_for(rendered)
    in_place = kernel.assign_target is None or cg.assign_in_place_ok(kernel)
    image = cg.image_weight(kernel, in_sizes, self.caps) if kernel.kind == "matmul" and not any(d.is_quantized for d in in_dtypes) else None
    return _Launch(clk, rendered, in_place, image)

  def _image_launch(self, kernel, in_dtypes, in_sizes):
    idx = cg.index_type(kernel, in_sizes)
    try: rendered, clk = self._matmul_tile(kernel, lambda config: cg.render_matmul(kernel, in_dtypes, idx, config, image=True), "matmul_image")
    except RuntimeError: return None   # no tile of the image variant runs here: the buffer variant does
    return _Launch(clk, rendered, True)

  def _matmul_tile(self, kernel, make, family="matmul"):
    _, (_, m, n, _) = cg.matmul_shape(kernel)
    return self.pick_tile(family, m, n, make)

  def pick_tile(self, family, m, n, make):
    """(rendered, cl.Kernel) of the first tile for an (m, n) matmul output (codegen/tiles.py,
    biggest first) that builds and whose work-group the built kernel takes (its
    CL_KERNEL_WORK_GROUP_SIZE and local memory); make(config) renders a tile (a codegen Rendered
    whose notes hold "config"). family names the kernel template (matmul, matmul_image): tiles
    the driver refused for it before are not tried, and a tile that fails to build is refused
    from now on once a smaller one builds (a source that builds with no tile is an error)."""
    refused, failed, tried, log_text = self.refused_tiles(family), {}, [], ""
    for config in tiles.matmul_tiles(m, n, self.caps.max_work_group_size, self.caps.max_work_item_sizes[:2], self.caps.local_mem_size, refused):
      rendered = make(config)
      try: clk, limit = self._kernel_for(rendered)
      except CLBuildError as e:
        failed[str(config)], log_text = "build failed", e.build_log
        tried.append(f"{config}: build failed")
        continue
      local_mem = clk.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, self.device)
      if config.threads > limit or local_mem > self.caps.local_mem_size:
        tried.append(f"{config}: the built kernel takes {limit} work-items and {self.caps.local_mem_size} bytes of local memory, not {config.threads} and {local_mem}")
        continue
      if failed: self.refuse_tiles(family, failed, persist=True)
      if DEBUG >= 3: log.info(f"OpenCL: {rendered.name} tile {config} ({config.threads} work-items)")
      return rendered, clk
    skipped = "".join(f"; {t} refused before ({why})" for t, why in refused.items())
    raise RuntimeError(f"OpenCL: no {family} tile for a {m}x{n} output runs on {self.caps.name} (work-group limit "
                       f"{self.caps.max_work_group_size}, local memory {self.caps.local_mem_size} bytes): tried "
                       + ("; ".join(tried) or "none") + skipped + (f"\nlast build log:\n{log_text}" if log_text else ""))

  # ---- tiles the driver refused, remembered per device

  def _device_key(self):
    return " / ".join([self.caps.platform, self.caps.name, self.caps.version, self.caps.driver_version])

  def refused_tiles(self, family):
    """{tile: reason} of the tiles this device's driver refused for the `family` kernel template:
    those of this process and those remembered in tiles.json in the cache folder. A template
    whose source changes starts afresh (its key holds a hash of the source)."""
    if self._refused is None:
      try: saved = json.loads((self.cache_dir / "tiles.json").read_text()).get(self._device_key(), {})
      except (OSError, ValueError, AttributeError): saved = {}
      self._refused = {k: dict(v) for k, v in saved.items() if isinstance(v, dict)}
    return self._refused.setdefault(self._family_key(family), {})

  @staticmethod
  def _family_key(family):
    name = {"matmul": "matmul.cl", "matmul_image": "matmul_image.cl"}.get(family)
    return f"{family} {hashlib.sha256(read_kernel(name).encode()).hexdigest()[:12]}" if name else family

  def refuse_tiles(self, family, reasons, persist):
    """Refuse tiles ({tile: reason}) from now on; persist: also in tiles.json (once a smaller
    tile ran, so that a source that never builds is not remembered as refused tiles)."""
    self.refused_tiles(family).update(reasons)
    if not persist: return
    for tile, why in reasons.items(): log.warning(f"OpenCL: {self.caps.name} refused the {family} tile {tile} ({why}); smaller tiles from now on")
    path = self.cache_dir / "tiles.json"
    try:
      try: saved = json.loads(path.read_text())
      except (OSError, ValueError): saved = {}
      if not isinstance(saved, dict): saved = {}
      mine = saved.setdefault(self._device_key(), {})
      mine.setdefault(self._family_key(family), {}).update(reasons)
      write_cache_file(path, json.dumps(saved, indent=1, sort_keys=True))   # a concurrent writer's refusals may be lost, and are found again
    except OSError as e:
      log.warning(f"OpenCL: cannot write {path} ({e}); refused tiles will be tried again next time")

  def _kernel_for(self, rendered):
    if DEBUG >= 4: print(f"----- {rendered.name} global={rendered.global_size} local={rendered.local_size}\n{rendered.src}")
    return self.kernel(rendered.name, rendered.src)

  def _refit(self, kernel, in_dtypes, in_sizes, launch, why):
    """After the driver refused to launch `launch` (why: the error's name): the same kernel with a
    smaller work-group, from now on. A matmul's tile is refused for this device (remembered once
    the smaller one ran, see run); other kernels are rendered for half the work-group."""
    launches = self._launches[kernel]
    config = launch.rendered.notes.get("config")
    if config is not None:
      family = "matmul_image" if "image" in launch.rendered.extra_args else "matmul"
      self.refuse_tiles(family, {str(config): f"{why} at launch"}, persist=False)
      if family == "matmul_image": launches[in_dtypes].image_launch = _UNTRIED
      else: del launches[in_dtypes]
      return family, str(config), why
    local = prod(launch.local_size)
    if local <= 1: raise RuntimeError(f"OpenCL: {self.caps.name} refused to launch {kernel.name} ({why}) even with one work-item")
    launches[in_dtypes] = self._build_launch(kernel, in_dtypes, in_sizes, max_local=local // 2)
    return None

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
    refits = []
    while True:   # until the driver takes the launch: each refusal, a smaller work-group (_refit)
      launch = self._launch_of(kernel, in_dtypes, in_sizes)
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
      try:
        self._launch(launch.clk, launch.global_size, launch.local_size, args)
        break
      except cl.Error as e:
        why = REFUSED_LAUNCH.get(getattr(e, "code", None))
        if why is None: raise
        refits.append(self._refit(kernel, in_dtypes, in_sizes, launch, why))
    for family, tile, why in filter(None, refits):   # a smaller tile ran: remember the refusal
      self.refuse_tiles(family, {tile: f"{why} at launch"}, persist=True)
    if "err" in extra: self._check_index_error(kernel, ins)
    if assign_out is not None and not in_place:   # the kernel read the target: write it afterwards
      cl.enqueue_copy(self.queue, assign_out.data, out.data, byte_count=out.nbytes)
      return assign_out
    return out

  def _split(self, kernel, ins):
    """A kernel with more input buffers than the device takes (a cat of many tensors): run
    subtrees of its AST as kernels of their own until the rest fits."""
    done = split_kernel(kernel, ins, self.caps.max_buffers, self.run)
    if done is None: raise RuntimeError(f"OpenCL: kernel {kernel.name} reads {len(ins)} buffers, more than {self.caps.name} takes ({self.caps.max_buffers}), and cannot be split")
    return done

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
    self.caps.preferred_work_group_multiple = clk.get_work_group_info(cl.kernel_work_group_info.PREFERRED_WORK_GROUP_SIZE_MULTIPLE, self.device)
    a = np.linspace(-2, 2, 16, dtype=np.float32)
    h = np.linspace(0, 1, 16, dtype=np.float16)
    ba, bh = self.from_numpy(a, dtypes.float32), self.from_numpy(h, dtypes.float16)
    out = self.alloc(16, dtypes.float32)
    clk(self.queue, (16,), None, out.data, ba.data, bh.data)
    got = self.to_numpy(out)
    want = a * 2 + h.astype(np.float32)
    if not np.allclose(got, want, atol=1e-6):
      raise RuntimeError(f"OpenCL self-check failed on {self.caps.name}: max error {np.abs(got - want).max()}")
