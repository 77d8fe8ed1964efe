"""The sharder: parameter-like buffers (frozen weights, trainable weights, optimizer moments,
gradients) paged between device memory, host RAM and disk under byte budgets.

Every managed Buffer gets a Page, which lives in exactly one tier:
  gpu   (OpenCL and Vulkan buffers) buf.data is device memory kernels read
  ram   a NumPy array in host memory: buf.data for the NumPy backend, page.host for the GPU ones
  disk  nothing in memory; the bytes are in the page's shard file or, for a frozen weight
        memory-mapped from a weight file, in that file (re-read from there, never written)
Before a kernel runs, run_kernel hands its input buffers to acquire(): each is brought up to
the tier kernels read (least-recently-used pages move down a tier when a budget would be
exceeded) and pinned until the kernel is done. A kernel that writes a page (an optimizer
update) makes its disk copy stale, so evicting it writes it back; clean pages are dropped.

On Linux a page of at least Sharder.map_from bytes that the NumPy backend reads, once written,
is then paged through a shared mapping of its shard file: evicting it drops its memory pages
from this process (the kernel keeps them in its page cache and writes them back in its own
time), and loading it maps them again: no read, no write, no fresh memory per move.

Budgets hold at every moment: bytes are reserved before anything is read or copied, and
`peak` records the most each tier ever held. Prefetch: the scheduler also hands over the
kernels that come next, and the operating system is asked to read the disk pages they need
in the background while the current kernel computes (forward: the next layer; backward: the
one before), so loading them is a copy from the page cache.
"""
import atexit, itertools, math, mmap, os, shutil, sys, tempfile, weakref
import numpy as np
try:
  import fcntl
except ImportError:   # Windows: no locks, so no cleanup of other processes' folders
  fcntl = None
from minift.dtype import dtypes
from minift.errors import UserError
from minift.runtime.buffer import Pager, active_pager, set_pager

MB = 2 ** 20
MAPPABLE = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")   # elsewhere DONTNEED may keep the pages resident
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Linux 5.14+; Python 3.11's mmap lacks the name


def size(nbytes):
  return f"{nbytes / MB:.1f} MiB" if nbytes >= MB / 10 else f"{nbytes / 1024:.1f} KiB"


class ShardError(UserError, RuntimeError):
  """The sharder cannot do what was asked (a budget too small, a full or unwritable disk);
  every tensor is still intact in memory or on disk when this is raised."""


class Page:
  __slots__ = ("ref", "name", "nbytes", "np_dtype", "top", "tier", "host", "source", "file", "disk_valid",
               "kind", "last_use", "pins", "advised", "mapping", "mapped", "__weakref__")

  def __init__(self, buf, name, kind, source):
    self.ref, self.name, self.nbytes, self.kind = weakref.ref(buf), name, buf.nbytes, kind   # kind: frozen, trainable, optimizer, gradient
    self.np_dtype = np.uint8 if buf.dtype is dtypes.bool else buf.dtype.np
    self.top = "ram" if buf.device.name == "numpy" else "gpu"   # the tier kernels read
    self.tier, self.host, self.file, self.last_use, self.pins, self.advised = self.top, None, None, 0, 0, False
    self.mapping = self.mapped = None   # a shared mmap of the shard file and the flat array over it
    self.source = source          # (path, byte offset) of a read-only file holding exactly these bytes
    self.disk_valid = source is not None


def file_source(arr):
  """(path, offset) when arr is a C-contiguous view of a read-only np.memmap (a weight file)."""
  root = arr
  while isinstance(root.base, np.ndarray): root = root.base   # views of a memmap are memmaps too: find the mapping itself
  if not isinstance(root, np.memmap) or root.filename is None or root.mode != "r" or not arr.flags.c_contiguous: return None
  return root.filename, root.offset + arr.__array_interface__["data"][0] - root.__array_interface__["data"][0]


def _read(path, offset, dtype, count):
  out = np.empty(count, dtype)
  with open(path, "rb") as f:
    f.seek(offset)
    got = f.readinto(memoryview(out).cast("B"))
  if got != out.nbytes: raise ShardError(f"{path}: expected {out.nbytes} bytes at offset {offset}, read {got} (file changed or truncated?)")
  return out


def _lock_new(folder):
  """Lock a fresh shard folder for the life of this process (an open descriptor, or None). Its
  `.lock` is made under another name and flocked before it is renamed: a `.lock` another
  process finds was always locked by its maker first, so a free one means the maker is gone."""
  if fcntl is None: return None
  fd = os.open(os.path.join(folder, ".lock.new"), os.O_RDWR | os.O_CREAT, 0o600)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(os.path.join(folder, ".lock.new"), os.path.join(folder, ".lock"))
  except OSError:   # a file system without locks: the folder is still removed on close
    os.close(fd)
    return None
  return fd


def remove_dead_shard_folders(parent):
  """Delete the shard folders in parent left by killed processes (their `.lock` is free: the
  kernel drops the lock of a process however it ends). Returns the folders removed."""
  removed = []
  try:
    entries = os.listdir(parent) if fcntl is not None else []
  except OSError:
    return removed
  for entry in entries:
    if not entry.startswith("minift-shard-"): continue
    folder = os.path.join(parent, entry)
    try:
      fd = os.open(os.path.join(folder, ".lock"), os.O_RDONLY)
    except OSError:   # being made right now, another user's (0700), or not a shard folder
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:   # its process is alive
      continue
    else:
      shutil.rmtree(folder, ignore_errors=True)
      removed.append(folder)
    finally:
      os.close(fd)
  return removed


def active():
  """The Sharder that is paging now, or None."""
  pager = active_pager()
  return pager if isinstance(pager, Sharder) else None


class Sharder(Pager):
  """with Sharder(ram_budget_mb=128) as sh: sh.manage_model(model, optimizer); train as usual.

  ram_budget_mb / gpu_budget_mb: bytes managed pages may hold in host RAM / device memory
  (None: unlimited). directory: where the shard folder is made (a fresh private subfolder,
  removed on close or exit; the shard folders of killed processes found there are removed). fp16_disk: frozen float32 weights written to disk as float16;
  fp16_trainable: trainable weights too (both lose precision: off by default). Optimizer
  moments are always kept in float32: Adam's second moment (g^2) underflows float16.
  prefetch: have the OS read upcoming pages ahead (posix_fadvise WILLNEED). optimizer_only:
  page just the optimizer's state; weights and gradients stay in memory and nothing is split.
  A full fine-tune's Adam moments are twice the weights and only the update reads them, so
  paging them costs a read and a write of each per step and nothing in forward or backward
  (through a mapping: neither, see the module's docstring)."""

  map_from = MB      # pages this large go through a mapping of their file (tests lower it)
  lookahead = 64     # kernels ahead that prefetch looks at (a transformer layer is 20-40)
  max_mapped = 512   # each mapping holds a file descriptor (1024 is a common limit); more pages are copied

  def __init__(self, ram_budget_mb=None, gpu_budget_mb=None, directory=None, fp16_disk=False, fp16_trainable=False,
               prefetch=True, trace=False, optimizer_only=False):
    if active_pager() is not None: raise RuntimeError("a Sharder is already active; close it first")
    for flag, v in (("--shard_budget_mb", ram_budget_mb), ("--gpu_budget_mb", gpu_budget_mb)):
      if v is not None and not v > 0: raise ValueError(f"{flag} must be a positive number of MiB, got {v}")
    self.budget = {"gpu": gpu_budget_mb * MB if gpu_budget_mb else float("inf"),
                   "ram": ram_budget_mb * MB if ram_budget_mb else float("inf")}
    self.used, self.peak = {"gpu": 0, "ram": 0}, {"gpu": 0, "ram": 0}
    self.trace = [] if trace else None          # (event, page name, gpu bytes, ram bytes) after every change
    self.fp16_disk, self.fp16_trainable, self.optimizer_only = fp16_disk, fp16_trainable, optimizer_only
    self.pages, self.clock, self.moves = {}, 0, 0   # moves: pages loaded, evicted or prefetched so far
    self.stats = {"loads": 0, "evictions": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0, "bytes_mapped": 0, "prefetched": 0}
    parent = directory or tempfile.gettempdir()
    try:
      os.makedirs(parent, exist_ok=True)
      self.removed = remove_dead_shard_folders(parent)
      self.dir = tempfile.mkdtemp(prefix="minift-shard-", dir=parent)   # private (0700), never an existing folder
      self._lock = _lock_new(self.dir)
    except OSError as e:
      raise ShardError(f"--shard_dir {parent}: cannot create a shard folder there ({e.strerror})") from None
    self.prefetch = prefetch and hasattr(os, "posix_fadvise")
    self._scanned = (-1, -1)   # (moves, clock) at the last prefetch scan
    self._file_ids = itertools.count()
    self._mapped = 0
    self._closed = False
    atexit.register(self.close, restore=False)
    set_pager(self)

  def __enter__(self): return self
  def __exit__(self, *exc): self.close()

  def close(self, restore=True):
    """Stop paging and remove the shard folder. restore: first bring every paged-out tensor
    back into memory, so it stays usable (a run that is ending does not need that)."""
    if self._closed: return
    self._closed = True
    if active_pager() is self: set_pager(None)
    self.budget = {"gpu": float("inf"), "ram": float("inf")}   # everything comes back
    for page in list(self.pages.values()) if restore else ():
      buf = page.ref()
      if buf is not None and page.tier != page.top: self._restore(page, buf)
      if buf is not None and page.mapped is not None and buf.data is page.mapped: buf.data = np.array(page.mapped)   # off the file removed below
    self.pages.clear()
    shutil.rmtree(self.dir, ignore_errors=True)
    if self._lock is not None: os.close(self._lock)   # after the folder is gone: a live lock keeps others from removing it
    self._lock = None

  # ---- registration

  def manage(self, tensor, name, kind=None):
    """Page the buffer under `tensor` (realized first). kind: 'frozen' (nothing writes it),
    'trainable' or 'optimizer' (default: from tensor.requires_grad). A frozen weight still memory-mapped from its file is
    dropped from memory right away and read from the file when needed. Under optimizer_only any
    other kind is left alone (returns None)."""
    if tensor.lazydata.base.buffer is None: tensor.realize()
    buf = tensor.lazydata.base.buffer
    if buf is None: raise ValueError(f"sharder: {name} is not a buffer (a lazy view of a computation)")
    kind = kind or ("trainable" if tensor.requires_grad else "frozen")
    if self.optimizer_only and kind != "optimizer": return None
    page = self.page_of(buf)
    if page is not None:   # managed while loading or since it was made; now it has its role and name
      page.kind, page.name = kind, name
      return page
    source = file_source(buf.data) if kind == "frozen" and buf.device.name == "numpy" else None
    if buf.nbytes > min(self.budget.values()):
      why = "moments are paged whole (--shard_optimizer_only)" if self.optimizer_only else "only Embedding and Linear weights are split (Sharder.split_large)"
      raise ShardError(f"{name} ({size(buf.nbytes)}) is larger than the smallest sharding budget ({size(min(self.budget.values()))}): {why}; raise the budget")
    page = self.pages[id(buf)] = Page(buf, name, kind, source)
    weakref.finalize(buf, self._forget, id(buf), weakref.ref(page))
    if source is not None:                       # nothing read yet: leave it in the file
      buf.data, page.tier = None, "disk"
    else:
      self._make_room(page.top, page.nbytes, protect=(page,))
      self.used[page.top] += page.nbytes
      self._note("manage", page)
      if self._mappable(page):   # onto its file now: the memory it leaves is reused long before any peak
        self._write(page, buf.data)
        self._map(page)
        if page.mapped is not None: buf.data = page.mapped
    return page

  def adopt(self, model, name):
    """Page parameter `name` of model as soon as a loader has set it, so loading a model larger
    than the budget never holds all of it. A weight split_large() will split is left to it."""
    from minift.nn import RowSplit
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    if not (isinstance(mod, RowSplit) and self._too_big(mod)): self.manage(getattr(mod, attr), name)

  def rows_per_piece(self, shape, itemsize):   # itemsize: bytes per value (a fraction for a quantized dtype)
    """Rows per piece for a 2-d weight of `shape` bigger than a quarter of the smallest budget
    (so a kernel's pages and a prefetched next layer fit together), or None if it fits whole."""
    quarter = min(self.budget.values()) / 4
    if self.optimizer_only or shape[0] * shape[1] * itemsize <= quarter: return None
    return max(1, int(quarter // (shape[1] * itemsize)))

  def _too_big(self, mod):
    w = getattr(mod, "weight", None)
    return w is not None and self.rows_per_piece(w.shape, w.dtype.bytes_per_element) is not None

  def _split(self, mod):
    if not self._too_big(mod): return False
    mod.split(self.rows_per_piece(mod.weight.shape, mod.weight.dtype.bytes_per_element))
    return True

  def split_large(self, model):
    """Split the weight of every Embedding and Linear bigger than a quarter of the smallest
    budget into row pieces (RowSplit.split; see rows_per_piece). Call it before making the
    optimizer: the pieces are what trains. Returns the names of the layers split."""
    from minift.nn import RowSplit
    return [name for name, mod in model.named_modules() if isinstance(mod, RowSplit) and self._split(mod)]

  def manage_model(self, model, optimizer=None, grad_buffers=None):
    """Every parameter of model, every state tensor of optimizer and the gradient buffers
    (Trainer.grad_buffers, one per optimizer parameter); only the state under optimizer_only."""
    for name, t in model.named_parameters(): self.manage(t, name)
    if optimizer is not None:
      names = [n for n, t in model.named_parameters() if any(t is p for p in optimizer.params)]
      states = optimizer.state_tensors()
      # a weight's update reads all its moments at once (state tensors come as one list per
      # kind of moment, in weight order): together they must fit the budget
      per_weight = len(states) // len(names) if names else 0
      for j, name in enumerate(names if per_weight else []):   # (plain SGD has no state)
        moments = states[j::len(names)][:per_weight]
        need = sum(math.prod(t.shape) * t.dtype.itemsize for t in moments)
        tier, flag = ("ram", "--shard_budget_mb") if moments[0].device == "numpy" else ("gpu", "--gpu_budget_mb")   # where kernels read them
        if need > self.budget[tier]:
          raise ShardError(f"the optimizer update of {name} reads its {per_weight} moments ({size(need)}) at once: more than the "
                           f"{tier} budget of {size(self.budget[tier])}; raise {flag} to at least {math.ceil(need / MB)}")
      for i, t in enumerate(states):
        self.manage(t, f"optimizer.{i}" if i >= len(names) * 2 else f"optimizer.{'mv'[i // len(names)]}.{names[i % len(names)]}", kind="optimizer")
      for name, t in zip(names, grad_buffers or []): self.manage(t, f"grad.{name}", kind="gradient")
    return self

  def _forget(self, key, page_ref):
    page = page_ref()
    if page is None or self.pages.get(key) is not page: return
    del self.pages[key]
    if page.tier != "disk": self.used[page.tier] -= page.nbytes
    if page.mapping is not None: self._mapped -= 1
    if page.file:
      try: os.unlink(page.file)
      except OSError: pass

  # ---- what run_kernel and Tensor call

  def page_of(self, buf):
    page = self.pages.get(id(buf))
    return page if page is not None and page.ref() is buf else None

  def acquire(self, bufs, upcoming=None):
    """Bring the managed buffers among bufs to the tier kernels read, pinned."""
    pages = [p for p in map(self.page_of, bufs) if p is not None]
    self.clock += 1
    for page in pages: page.pins += 1                 # pinned first: bringing one up must not evict another
    try:
      for page in pages:
        page.last_use = self.clock
        if page.tier != page.top: self._restore(page, page.ref(), protect=pages)
    except BaseException:
      for page in pages: page.pins -= 1
      raise
    # rescan what comes next when pages moved since the last look, or every 8 kernels
    if upcoming is not None and self.prefetch and (self.moves != self._scanned[0] or self.clock - self._scanned[1] >= 8):
      self._scanned = (self.moves, self.clock)
      self._prefetch(upcoming, pages)
    return pages

  def release(self, pages, written=()):
    """Unpin pages; written: the buffers the kernel wrote, whose disk copies are now stale."""
    for page in pages: page.pins -= 1
    for buf in written:
      page = self.page_of(buf)
      if page is not None: page.disk_valid, page.source = False, None

  def fetch(self, buf, write=False):
    """Make buf's data valid in memory for a direct read (numpy()) or write (assign from NumPy)."""
    pages = self.acquire([buf])
    self.release(pages, [buf] if write else ())

  # ---- moving pages

  def _note(self, event, page):
    self.moves += 1
    for tier in ("gpu", "ram"): self.peak[tier] = max(self.peak[tier], self.used[tier])
    if self.trace is not None: self.trace.append((event, page.name, self.used["gpu"], self.used["ram"]))

  def _make_room(self, tier, nbytes, protect=()):
    """Evict least-recently-used pages of tier until nbytes more fit its budget."""
    if nbytes > self.budget[tier]:
      raise ShardError(f"a {size(nbytes)} buffer cannot fit the {tier} budget of {size(self.budget[tier])}")
    while self.used[tier] + nbytes > self.budget[tier]:
      victims = [p for p in self.pages.values() if p.tier == tier and not p.pins and p not in protect]
      if not victims:
        held = ", ".join(p.name for p in self.pages.values() if p.tier == tier)
        raise ShardError(f"the {tier} budget of {size(self.budget[tier])} cannot hold {size(nbytes)} more: "
                         f"everything in it is in use by the current kernel ({held}); raise the budget")
      self._evict(min(victims, key=lambda p: p.last_use))

  def _evict(self, page):
    """Move page one tier down."""
    buf, dev = page.ref(), None
    if page.tier == "gpu":
      self._make_room("ram", page.nbytes)
      dev = buf.device
      page.host = dev.to_numpy(buf)
      self.used["ram"] += page.nbytes
      dev.page_out(buf)
      page.tier = "ram"
      self.used["gpu"] -= page.nbytes
    else:
      data = page.host if page.top == "gpu" else buf.data
      if page.mapped is not None and data is page.mapped:   # its bytes are the file's already
        page.mapping.madvise(mmap.MADV_DONTNEED)             # out of this process; kept in the page cache
        page.disk_valid = True
      else:
        if not page.disk_valid: self._write(page, data)
        if self._mappable(page): self._map(page)
      if page.top == "gpu": page.host = None
      else: buf.data = None
      page.tier = "disk"
      self.used["ram"] -= page.nbytes
    self.stats["evictions"] += 1
    self._note("evict", page)

  def _write(self, page, data):
    """Write page's bytes to its shard file. On failure the data stays where it is."""
    path = page.file or os.path.join(self.dir, f"{next(self._file_ids)}.bin")
    half = self._half(page) and page.mapping is None   # (a mapped file keeps its size)
    nbytes = page.nbytes // (2 if half else 1)
    try:
      # over the old bytes when the file has its size: truncating and writing anew makes the
      # file system give back and find again every block (3-5x slower for a 160 MB page)
      same = page.file is not None and os.path.getsize(path) == nbytes
      with open(path, "r+b" if same else "wb") as f: write_array(f, data.astype(np.float16) if half else data)
    except OSError as e:
      try: os.unlink(path)
      except OSError: pass
      page.file = None
      raise ShardError(f"--shard_dir {self.dir}: cannot write {page.name} ({size(page.nbytes)}): {e.strerror or e}. "
                       "Nothing was lost: it is still in memory, and the last checkpoint is untouched") from None
    page.file, page.disk_valid = path, True
    self.stats["writes"] += 1
    self.stats["bytes_written"] += nbytes

  def _half(self, page):
    return page.np_dtype == np.float32 and ((self.fp16_disk and page.kind == "frozen") or (self.fp16_trainable and page.kind == "trainable"))

  def _mappable(self, page):
    """Whether page, not mapped yet, can go through a mapping of its shard file: not a weight read
    from its own file (never written), not one kept as float16 on disk (read and converted)."""
    return (MAPPABLE and page.mapping is None and page.top == "ram" and page.source is None and not self._half(page)
            and page.nbytes >= max(self.map_from, 1) and self._mapped < self.max_mapped)

  def _map(self, page):
    """Page a page through a shared mapping of its file, written just before. Where the file
    system cannot map it (or file descriptors run out) the page stays one that is copied."""
    try:
      with open(page.file, "r+b") as f: page.mapping = mmap.mmap(f.fileno(), page.nbytes)
    except (OSError, ValueError):
      return
    page.mapped = np.frombuffer(page.mapping, page.np_dtype)
    self._mapped += 1

  def _read_page(self, page):
    """The page's bytes as a flat NumPy array."""
    count = page.nbytes // np.dtype(page.np_dtype).itemsize
    if page.source is not None: return _read(page.source[0], page.source[1], page.np_dtype, count)
    half = os.path.getsize(page.file) == page.nbytes // 2 and page.np_dtype == np.float32
    data = _read(page.file, 0, np.float16 if half else page.np_dtype, count)
    return data.astype(np.float32) if half else data

  def _restore(self, page, buf, protect=()):
    """Bring page up to the tier kernels read."""
    if page.tier == "disk":
      self._make_room("ram", page.nbytes, protect)
      self.used["ram"] += page.nbytes
      if page.mapped is not None:
        data = page.mapped
        try: page.mapping.madvise(MADV_POPULATE_WRITE)   # one call maps every page, instead of a fault each
        except OSError: pass                             # (older kernels: the faults happen as it is read)
        self.stats["bytes_mapped"] += page.nbytes
      else:
        try:
          data = self._read_page(page)
        except BaseException:
          self.used["ram"] -= page.nbytes
          raise
        self.stats["bytes_read"] += page.nbytes
      self.stats["loads"] += 1
      page.advised = False
      if page.top == "gpu": page.host = data
      else: buf.data = data
      page.tier = "ram"
      self._note("load", page)
    if page.tier == "ram" and page.top == "gpu":
      self._make_room("gpu", page.nbytes, protect)
      buf.device.page_in(buf, page.host)
      page.host, page.tier = None, "gpu"
      self.used["gpu"] += page.nbytes
      self.used["ram"] -= page.nbytes
      self._note("upload", page)

  def _prefetch(self, upcoming, current):
    """Ask the kernel to read ahead the file ranges of the disk pages the next kernels need, as
    far ahead as the RAM budget reaches, within the next `lookahead` kernels (walking every kernel
    left, when few touch a page, cost 0.1 s a step in a full step paging only its moments). The
    read happens in the background without a thread of ours (a reader thread competing with BLAS
    for the cores slowed matmuls 2x on a 2-core machine); the load itself is then a copy from the
    page cache."""
    ahead, seen = 0, set(current)
    for bufs in itertools.islice(upcoming(), self.lookahead):
      for buf in bufs:
        page = self.page_of(buf)
        if page is None or page in seen: continue
        seen.add(page)
        ahead += page.nbytes
        if ahead > self.budget["ram"]: return
        if page.tier == "disk" and not page.advised:
          path, offset = page.source or (page.file, 0)
          try:
            fd = os.open(path, os.O_RDONLY)
            try: os.posix_fadvise(fd, offset, page.nbytes, os.POSIX_FADV_WILLNEED)
            finally: os.close(fd)
          except OSError: continue
          page.advised = True   # until it is loaded
          self.stats["prefetched"] += 1



def write_array(f, arr):
  """arr's bytes into an open binary file, without a second copy in memory."""
  arr = np.ascontiguousarray(arr)
  f.write(memoryview(arr.reshape(-1)).cast("B"))
