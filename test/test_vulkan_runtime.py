"""The Vulkan layer (minift/backends/vulkan/vk.py) on the Vulkan device here (Mesa's lavapipe in CI): hand-written
GLSL compute shaders against NumPy, memory, caches, errors, and the validation layer watching all of it.

Skipped, with the reason, only where there is no Vulkan loader or no device. Where the Khronos
validation layer is installed every device here runs under it (synchronization validation on, so
a missing barrier is an error) and a test fails if it reported anything."""
import os, re, shutil, struct, subprocess, sys
import numpy as np
import pytest
from minift.backends.vulkan import vk


def _why_unavailable():
  try:
    instance = vk.Instance(validation=False)
  except vk.VulkanUnavailable as e:
    return str(e)
  try:
    if not instance.physical_devices(): return "the Vulkan loader lists no device"
  finally:
    instance.close()
  return None


REASON = _why_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no Vulkan here: {REASON}")
VALIDATION = REASON is None and vk.VALIDATION_LAYER in vk.instance_layers()
_opened = []


def _device(tmp_path, **kw):
  """A Device under the validation layer (where installed), checked and closed after the test."""
  d = vk.Device(validation=VALIDATION, cache_dir=kw.pop("cache_dir", tmp_path / "cache"), **kw)
  _opened.append(d)
  return d


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
  d = vk.Device(validation=VALIDATION, cache_dir=tmp_path_factory.mktemp("vkcache"))
  yield d
  d.close()
  assert d.validation_messages == []


@pytest.fixture(autouse=True)
def _no_validation_messages(request):
  """Every device a test used reported no validation error or warning."""
  shared = request.getfixturevalue("dev") if "dev" in request.fixturenames else None
  yield
  devices, _opened[:] = list(_opened), []
  for d in devices: d.close()
  for d in devices + ([shared] if shared else []):
    messages = list(d.validation_messages)
    d.validation_messages.clear()
    assert messages == [], f"validation layer reported: {messages}"


ADD = """#version 450
layout(local_size_x = 64) in;
layout(std430, binding = 0) writeonly buffer Out { float o[]; };
layout(std430, binding = 1) readonly buffer A { float a[]; };
layout(std430, binding = 2) readonly buffer B { float b[]; };
layout(push_constant) uniform P { uint n; float alpha; } p;
void main() {
  uint i = gl_GlobalInvocationID.x;
  if (i < p.n) o[i] = a[i] + p.alpha * b[i];
}
"""


def _add(d):
  return d.kernel("add", ADD, 3, 8)


def _array(d, values):
  m = d.alloc(values.nbytes)
  d.upload(m, values)
  return m


def _groups(n, local=64): return [(n + local - 1) // local]


def test_add_with_push_constants_over_many_workgroups(dev):
  rng = np.random.default_rng(0)
  n = 1000   # 16 workgroups of 64, the last one partly idle
  a, b = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
  ma, mb, out = _array(dev, a), _array(dev, b), dev.alloc(4 * n)
  submits = dev.stats["submits"]
  dev.dispatch(_add(dev), _groups(n), [out, ma, mb], struct.pack("<If", n, 0.5))
  got = dev.download(out, np.float32)
  np.testing.assert_allclose(got, a + np.float32(0.5) * b, rtol=1e-6, atol=1e-6)
  assert dev.stats["submits"] == submits + 1


UNARY = """#version 450
layout(local_size_x = 64) in;
layout(std430, binding = 0) writeonly buffer Out { float o[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(push_constant) uniform P { uint n; float mul; float add; } p;
void main() {
  uint i = gl_GlobalInvocationID.x;
  if (i < p.n) o[i] = x[i] * p.mul + p.add;
}
"""


def test_dependent_chain_is_one_submit_with_barriers_only_where_needed(dev):
  n = 4099
  x = np.linspace(-3, 3, n, dtype=np.float32)
  k, add = dev.kernel("affine", UNARY, 2, 12), _add(dev)
  mx, t1, t2, t3, u = _array(dev, x), dev.alloc(4 * n), dev.alloc(4 * n), dev.alloc(4 * n), dev.alloc(4 * n)
  submits, barriers = dev.stats["submits"], dev.stats["barriers"]
  dev.dispatch(k, _groups(n), [t1, mx], struct.pack("<Iff", n, 2.0, 1.0))            # t1 = 2x + 1
  dev.dispatch(k, _groups(n), [u, mx], struct.pack("<Iff", n, -1.0, 0.0))            # u = -x: independent of t1
  assert dev.stats["barriers"] == barriers
  dev.dispatch(k, _groups(n), [t2, t1], struct.pack("<Iff", n, 3.0, -2.0))           # t2 = 3 t1 - 2: reads t1
  dev.dispatch(add, _groups(n), [t3, t2, t1], struct.pack("<If", n, -1.0))           # t3 = t2 - t1: reads t2
  assert dev.stats["barriers"] == barriers + 2
  dev.dispatch(k, _groups(n), [t1, mx], struct.pack("<Iff", n, 0.0, 7.0))             # t1 = 7: overwrites what t3 read
  assert dev.stats["barriers"] == barriers + 3
  assert dev.stats["submits"] == submits   # nothing submitted yet: all five are in one command buffer
  t1_ref = x * np.float32(2) + np.float32(1)
  want = (t1_ref * np.float32(3) - np.float32(2)) - t1_ref
  np.testing.assert_allclose(dev.download(t3, np.float32), want, rtol=1e-6, atol=1e-5)
  assert dev.stats["submits"] == submits + 1
  np.testing.assert_array_equal(dev.download(t1, np.float32), np.full(n, 7, np.float32))
  np.testing.assert_array_equal(dev.download(u, np.float32), -x)   # nothing pending: no submit
  assert dev.stats["submits"] == submits + 1


SUM = """#version 450
layout(local_size_x = 256) in;
layout(std430, binding = 0) writeonly buffer Out { float partial[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(push_constant) uniform P { uint n; } p;
shared float acc[256];
void main() {
  uint lid = gl_LocalInvocationID.x, base = gl_WorkGroupID.x * 1024u;
  float s = 0.0;
  for (uint k = 0u; k < 4u; k++) {   // each invocation adds 4 elements, 256 apart
    uint i = base + k * 256u + lid;
    if (i < p.n) s += x[i];
  }
  acc[lid] = s;
  barrier();
  for (uint half_ = 128u; half_ > 0u; half_ >>= 1) {
    if (lid < half_) acc[lid] += acc[lid + half_];
    barrier();
  }
  if (lid == 0u) partial[gl_WorkGroupID.x] = acc[0];
}
"""


def test_reduction_in_shared_memory(dev):
  n = 300_001
  x = np.random.default_rng(1).uniform(-1, 1, n).astype(np.float32)
  k = dev.kernel("sum", SUM, 2, 4)
  groups = (n + 1023) // 1024
  mx, partial, total = _array(dev, x), dev.alloc(4 * groups), dev.alloc(4)
  dev.dispatch(k, [groups], [partial, mx], struct.pack("<I", n))
  dev.dispatch(k, [1], [total, partial], struct.pack("<I", groups))   # 294 partials: one workgroup
  np.testing.assert_allclose(dev.download(partial, np.float32), np.add.reduceat(x.astype(np.float64), np.arange(0, n, 1024)), rtol=1e-5, atol=1e-5)
  assert dev.download(total, np.float32)[0] == pytest.approx(x.astype(np.float64).sum(), rel=1e-5, abs=1e-3)


def _pieces_glsl(name, elem, first_binding, k, per_piece, access=""):
  """How a shader reads/writes a tensor of k pieces (the renderer's scheme): k consecutive
  bindings and load_<name>/store_<name> picking the piece by the element index."""
  shift = per_piece.bit_length() - 1
  decls = "".join(f"layout(std430, binding = {first_binding + j}) {access} buffer {name.upper()}{j} {{ {elem} {name}{j}[]; }};\n" for j in range(k))
  load = "".join(f"  if (p == {j}u) return {name}{j}[q];\n" for j in range(k - 1)) + f"  return {name}{k - 1}[q];\n"
  store = "".join(f"  if (p == {j}u) {{ {name}{j}[q] = v; return; }}\n" for j in range(k - 1)) + f"  {name}{k - 1}[q] = v;\n"
  where = f"  uint p = i >> {shift}u, q = i & {per_piece - 1}u;\n"
  return (decls + ("" if access == "writeonly" else f"{elem} load_{name}(uint i) {{\n{where}{load}}}\n")
          + ("" if access == "readonly" else f"void store_{name}(uint i, {elem} v) {{\n{where}{store}}}\n"))


def _in_place_shader(k, per_piece):
  return ("#version 450\nlayout(local_size_x = 256) in;\n" + _pieces_glsl("x", "uint", 0, k, per_piece)
          + "layout(push_constant) uniform P { uint n; } pc;\n"
            "void main() {\n"
            "  for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += gl_NumWorkGroups.x * 256u) store_x(i, load_x(i) * 3u + 1u);\n"
            "}\n")


@pytest.mark.slow
def test_tensor_larger_than_max_storage_buffer_range(tmp_path):
  d = _device(tmp_path)
  assert d.window <= d.caps.max_storage_buffer_range
  n = (d.window + (4 << 20)) // 4   # uint32 elements: one window and 4 MiB more
  k = d.bindings_for(4 * n)
  assert k == 2 and 4 * n > d.caps.max_storage_buffer_range
  m = d.alloc(4 * n)
  assert len(m.pieces) == k and all(size <= d.caps.max_storage_buffer_range for _, _, size in m.pieces)
  x = np.arange(n, dtype=np.uint32) ^ np.uint32(0x5A5A5A5A)
  d.upload(m, x)
  d.dispatch(d.kernel("big_in_place", _in_place_shader(k, d.window // 4), k, 4), [4096], [m], struct.pack("<I", n))
  got = d.download(m, np.uint32)
  x *= np.uint32(3)
  x += np.uint32(1)
  np.testing.assert_array_equal(got, x)


REVERSE_COPY = """#version 450
layout(local_size_x = 64) in;
{src}{dst}layout(push_constant) uniform P {{ uint n; }} pc;
void main() {{
  uint i = gl_GlobalInvocationID.x;
  if (i < pc.n) store_d(i, load_s(pc.n - 1u - i) * 2.0);
}}
"""


def test_small_windows_split_tensors_into_pieces_across_blocks(tmp_path):
  d = _device(tmp_path, window=4096, block_size=16384)   # pieces of 1024 floats, blocks of 4 pieces
  n = 3 * 1024 + 517
  k = d.bindings_for(4 * n)
  assert k == 4
  x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
  src, dst = _array(d, x), d.alloc(4 * n)
  assert len({id(block) for m in (src, dst) for block, _, _ in m.pieces}) >= 2   # the pieces lie in several blocks
  shader = REVERSE_COPY.format(src=_pieces_glsl("s", "float", 0, k, 1024, "readonly"), dst=_pieces_glsl("d", "float", k, k, 1024, "writeonly"))
  d.dispatch(d.kernel("reverse", shader, 2 * k, 4), _groups(n), [src, dst], struct.pack("<I", n), writes=(1,))
  np.testing.assert_array_equal(d.download(dst, np.float32), x[::-1] * 2)
  # device copies and fills go piece by piece too, and partial host copies cross piece borders
  copy = d.alloc(4 * n)
  d.copy(copy, dst)
  d.fill(dst, 0)
  np.testing.assert_array_equal(d.download(copy, np.float32), x[::-1] * 2)
  np.testing.assert_array_equal(d.download(dst, np.float32), np.zeros(n, np.float32))
  d.upload(copy, np.arange(600, dtype=np.float32), offset=4 * 800)   # elements 800..1399: across the first border
  np.testing.assert_array_equal(d.download(copy, np.float32, count=700, offset=4 * 750)[50:650], np.arange(600, dtype=np.float32))


def test_window_must_be_a_power_of_two_the_device_allows(tmp_path):
  with pytest.raises(ValueError, match="power of two"):
    _device(tmp_path, window=3000)


@pytest.mark.parametrize("staging", [False, True], ids=["mapped", "staged"])
def test_upload_download_round_trip(tmp_path, staging):
  d = _device(tmp_path, force_staging=staging)
  assert d.unified == (d.caps.unified_memory and not staging)
  rng = np.random.default_rng(3)
  arrays = [rng.standard_normal(1001).astype(np.float32), rng.standard_normal(333).astype(np.float16),
            rng.integers(-2**31, 2**31 - 1, 777, dtype=np.int32), rng.integers(-2**62, 2**62, 99, dtype=np.int64),
            rng.integers(0, 2, 55).astype(np.bool_)]
  mems = [_array(d, a) for a in arrays]
  for a, m in zip(arrays, mems): np.testing.assert_array_equal(d.download(m, a.dtype), a)
  # a kernel between host copies, on either path
  a, b = arrays[0], rng.standard_normal(1001).astype(np.float32)
  out = d.alloc(a.nbytes)
  d.dispatch(_add(d), _groups(a.size), [out, mems[0], _array(d, b)], struct.pack("<If", a.size, 2.0))
  np.testing.assert_allclose(d.download(out, np.float32), a + 2 * b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="outside"):
    d.upload(mems[1], np.zeros(334, np.float16))


def test_staging_moves_more_than_the_staging_block(tmp_path):
  d = _device(tmp_path, force_staging=True, block_size=1 << 16)   # a 64 KiB staging block
  x = np.arange(100_000, dtype=np.int32)                            # 400 KB: several rounds
  m = _array(d, x)
  np.testing.assert_array_equal(d.download(m, np.int32), x)


FP16 = """#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
layout(local_size_x = 64) in;
layout(std430, binding = 0) writeonly buffer Out { float o[]; };
layout(std430, binding = 1) readonly buffer H { float16_t h[]; };
layout(push_constant) uniform P { uint n; } p;
void main() {
  uint i = gl_GlobalInvocationID.x;
  if (i < p.n) o[i] = float(h[i]) * 2.0;
}
"""


def test_float16_storage_buffers(dev):
  if not (dev.caps.storage16 and dev.caps.float16): pytest.skip(f"{dev.caps.name} has no 16-bit storage buffers or no float16")
  h = np.linspace(-4, 4, 999).astype(np.float16)
  out = dev.alloc(4 * h.size)
  dev.dispatch(dev.kernel("half_in", FP16, 2, 4), _groups(h.size), [out, _array(dev, h)], struct.pack("<I", h.size))
  np.testing.assert_array_equal(dev.download(out, np.float32), h.astype(np.float32) * 2)


def test_host_access_waits_for_pending_commands(dev):
  n = 256
  a, b = np.ones(n, np.float32), np.full(n, 2, np.float32)
  ma, mb, out = _array(dev, a), _array(dev, b), dev.alloc(4 * n)
  dev.dispatch(_add(dev), _groups(n), [out, ma, mb], struct.pack("<If", n, 1.0))   # recorded, not run
  dev.upload(ma, np.full(n, 100, np.float32))   # must not change what the recorded add reads
  np.testing.assert_array_equal(dev.download(out, np.float32), a + b)


def test_kernel_caches_hit_on_second_use(tmp_path):
  cache = tmp_path / "cache"
  first = _device(tmp_path, cache_dir=cache)
  k = first.kernel("affine", UNARY, 2, 12)
  assert first.compiler.stats == {"compiled": 1, "cache_hits": 0, "processes": 1} and first.stats["pipelines"] == 1
  assert first.kernel("affine", UNARY, 2, 12) is k   # in memory: nothing compiled or created again
  assert first.compiler.stats["compiled"] == 1 and first.stats["pipelines"] == 1
  first.close()
  saved = next(cache.glob("pipelines-*.pcache")).stat().st_size
  assert saved > 0

  second = _device(tmp_path, cache_dir=cache)   # a new start: SPIR-V from disk, the pipeline cache loaded
  assert second.pipeline_cache_loaded == saved
  k = second.kernel("affine", UNARY, 2, 12)
  assert second.compiler.stats == {"compiled": 0, "cache_hits": 1, "processes": 0}
  if second.feedback and saved > 32:   # drivers that store pipelines (lavapipe keeps only a 32-byte header) say it was a hit
    assert second.stats["pipeline_cache_hits"] == 1
  x = np.arange(100, dtype=np.float32)
  out = second.alloc(400)
  second.dispatch(k, _groups(100), [out, _array(second, x)], struct.pack("<Iff", 100, 2.0, 1.0))
  np.testing.assert_array_equal(second.download(out, np.float32), 2 * x + 1)
  second.kernel("affine2", UNARY.replace("p.mul + p.add", "p.mul - p.add"), 2, 12)   # another source compiles
  assert second.compiler.stats == {"compiled": 1, "cache_hits": 1, "processes": 1}

  for spv in cache.glob("*.spv"): spv.write_bytes(b"not SPIR-V")   # a damaged cache file is compiled again
  third = _device(tmp_path, cache_dir=cache)
  third.kernel("affine", UNARY, 2, 12)
  assert third.compiler.stats == {"compiled": 1, "cache_hits": 0, "processes": 1}


@pytest.mark.parametrize("name", ["glslc", "glslangValidator"])
def test_compile_many_batches_and_names_the_failing_shader(tmp_path, name):
  path = shutil.which(name)
  if path is None: pytest.skip(f"{name} is not installed")
  c = vk.GLSLCompiler(tmp_path, path)
  items = [(f"affine{i}", UNARY.replace("p.mul + p.add", f"p.mul + p.add + {i}.0")) for i in range(6)]
  c.compile_many(items + items[:2])   # the repeats compile once
  assert c.stats["compiled"] == 6 and c.stats["processes"] == (min(6, os.cpu_count()) if name == "glslc" else 6)   # glslc: many shaders per process
  assert all(c.compile(n, s) == c._spirv[c._key(s, "")] for n, s in items) and c.stats["compiled"] == 6
  broken = ("broken_kernel", UNARY.replace("p.mul + p.add", "p.mul + not_declared_anywhere"))
  fresh = [(f"more{i}", UNARY.replace("p.mul + p.add", f"p.mul * {i}.0")) for i in range(3)]
  with pytest.raises(vk.ShaderCompileError) as e: c.compile_many(fresh + [broken])
  assert "broken_kernel" in str(e.value) and "not_declared_anywhere" in str(e.value)
  c.compile_many(fresh)
  assert c.stats["compiled"] == 9   # the good ones beside the broken one were compiled and kept


def test_compile_error_names_kernel_and_carries_compiler_message(dev):
  bad = ADD.replace("a[i] + p.alpha * b[i]", "a[i] + undefined_thing")
  with pytest.raises(vk.ShaderCompileError) as e:
    dev.kernel("broken_add", bad, 3, 8)
  assert e.value.kernel_name == "broken_add" and e.value.src == bad
  assert "'broken_add'" in str(e.value) and "undefined_thing" in str(e.value) and "undeclared identifier" in str(e.value)
  assert "/tmp" not in e.value.message and "minift-glsl-" not in e.value.message


def test_suballocation_reuses_freed_space(tmp_path):
  d = _device(tmp_path, block_size=1 << 20)
  a, b = d.alloc(1000), d.alloc(5000)
  assert d.stats["allocations"] == 1 and a.pieces[0][0] is b.pieces[0][0]   # one block holds both
  a_at = a.pieces[0][:2]
  d.free(a)
  c = d.alloc(900)
  assert c.pieces[0][:2] == a_at                  # the freed hole, not new space
  d.free(c)
  d.free(b)                                       # between two holes: merged with both
  whole = d.alloc(1 << 19)                        # bigger than each hole was: they are one again
  assert whole.pieces[0][1] == 0 and d.stats["allocations"] == 1
  d.free(whole)
  # best fit: a small piece goes to the smallest hole it fits, keeping the large ones whole
  a, b, c, e = d.alloc(64 << 10), d.alloc(64 << 10), d.alloc(4 << 10), d.alloc(4 << 10)
  c_at = c.pieces[0][:2]
  d.free(a)
  d.free(c)                                       # holes: 64 KiB at 0, 4 KiB after b, and the rest
  assert d.alloc(4 << 10).pieces[0][:2] == c_at
  for m in (b, e): d.free(m)
  # freed while a recorded command uses it: the space is reused only after the flush
  x = _array(d, np.ones(64, np.float32))
  out = d.alloc(256)
  d.dispatch(_add(d), [1], [out, x, x], struct.pack("<If", 64, 1.0))
  x_at = x.pieces[0][:2]
  d.free(x)
  assert d.alloc(256).pieces[0][:2] != x_at
  np.testing.assert_array_equal(d.download(out, np.float32), np.full(64, 2, np.float32))
  assert d.alloc(256).pieces[0][:2] == x_at
  # a piece bigger than a block gets a block of its own; trim gives entirely free blocks back
  big = d.alloc(3 << 20)
  assert d.stats["allocations"] == 2 and big.pieces[0][0].size == 3 << 20
  d.free(big)
  held = d.bytes_reserved
  d.trim()
  assert d.bytes_reserved == held - (3 << 20)


def test_a_long_recording_reuses_freed_space_behind_a_barrier(tmp_path):
  """Intermediates freed while the recording still uses them: when nothing else fits, their space
  is handed out again behind a barrier, so the chain neither grows the memory nor submits early
  (and the validation layer's synchronization checks see no hazard)."""
  d = _device(tmp_path, block_size=64 << 10)
  n = 4096   # 16 KiB: four fit in the block
  x = _array(d, np.ones(n, np.float32))
  k = _add(d)
  for step in range(10):   # x <- x + x, each result in new memory, the old one freed at once
    y = d.alloc(4 * n)
    d.dispatch(k, _groups(n), [y, x, x], struct.pack("<If", n, 1.0))
    d.free(x)
    x = y
  assert d.stats["allocations"] == 1 and d.stats["submits"] == 0
  late = d.alloc(4 * n)   # recycled space that the recorded commands may still read: writing it from the host waits for them
  d.upload(late, np.full(n, 7, np.float32))
  assert d.stats["submits"] == 1
  np.testing.assert_array_equal(d.download(x, np.float32), np.full(n, 2.0 ** 10, np.float32))
  np.testing.assert_array_equal(d.download(late, np.float32), np.full(n, 7, np.float32))


def test_dispatch_checks_bindings_push_constants_and_limits(dev):
  k, m = _add(dev), dev.alloc(64)
  with pytest.raises(ValueError, match="'add' takes 3 bindings; got 2"):
    dev.dispatch(k, [1], [m, m], struct.pack("<If", 1, 1.0))
  with pytest.raises(ValueError, match="'add' takes 8 bytes of push constants, got 4"):
    dev.dispatch(k, [1], [m, m, m], struct.pack("<I", 1))
  with pytest.raises(ValueError, match="workgroups exceed"):
    dev.dispatch(k, [dev.caps.max_workgroup_count[0] + 1], [m, m, m], struct.pack("<If", 1, 1.0))
  with pytest.raises(ValueError, match="binds 999 storage buffers"):
    dev.kernel("too_many", ADD, 999)
  dev.free(m)
  with pytest.raises(ValueError, match="freed"):
    dev.dispatch(k, [1], [m, m, m], struct.pack("<If", 1, 1.0))


def test_timestamps_time_each_dispatch(tmp_path, monkeypatch):
  monkeypatch.setattr(vk, "TIMED_DISPATCHES", 2)   # a small query pool: the third dispatch submits the first two
  d = _device(tmp_path, profiling=True)
  if not d.profiling: pytest.skip(f"{d.caps.name}'s compute queue has no timestamps")
  n = 1 << 16
  x, out = _array(d, np.ones(n, np.float32)), d.alloc(4 * n)
  k = d.kernel("affine", UNARY, 2, 12)
  for name in ("one", "two", "three"): d.dispatch(k, _groups(n), [out, x], struct.pack("<Iff", n, 2.0, 0.0), name=name)
  d.flush()
  assert d.stats["submits"] == 2 and [label for label, _ in d.timings] == ["three"]
  assert 0 < d.timings[0][1] < 10


def test_vulkan_error_names_call_and_result():
  with pytest.raises(vk.VulkanError) as e:
    vk.Instance(validation=False, layers=["VK_LAYER_MINIFT_no_such_layer"])
  assert e.value.call == "vkCreateInstance" and e.value.result_name == "VK_ERROR_LAYER_NOT_PRESENT"
  assert str(e.value) == "vkCreateInstance failed: VK_ERROR_LAYER_NOT_PRESENT"


def _props(name, kind, api=vk.API_1_3):
  p = vk.VkPhysicalDeviceProperties(deviceType=kind, apiVersion=api)
  p.deviceName = name.encode()
  return p


def test_device_choice_prefers_gpus_and_follows_the_spec():
  found = [(0, None, _props("llvmpipe (LLVM 15)", 4)), (1, None, _props("Old GPU", 2, api=(1 << 22))),
           (2, None, _props("Mali-G710", 1)), (3, None, _props("Radeon RX", 2))]
  assert vk.select_physical_device(found)[0] == 3            # discrete (the Vulkan 1.0 one left out), then integrated, then CPU
  assert vk.select_physical_device(found[:3])[0] == 2
  assert vk.select_physical_device(found, "0")[0] == 0       # an index
  assert vk.select_physical_device(found, "mali")[0] == 2    # a name substring, any case
  with pytest.raises(vk.VulkanUnavailable, match=r"MINIFT_VK_DEVICE='adreno' names no Vulkan device \(have: 0: llvmpipe"):
    vk.select_physical_device(found, "adreno")
  with pytest.raises(vk.VulkanUnavailable, match="minift needs 1.1"):
    vk.select_physical_device(found, "old")


def test_device_env_var_picks_the_device(tmp_path, monkeypatch):
  instance = vk.Instance(validation=False)
  name = vk._text(instance.physical_devices()[-1][2].deviceName)
  instance.close()
  monkeypatch.setenv("MINIFT_VK_DEVICE", name[:6].upper())
  assert _device(tmp_path).caps.name == name


def _vulkaninfo(index):
  """'name = value' lines vulkaninfo prints for GPU `index`, first one of each name."""
  out = subprocess.run(["vulkaninfo"], capture_output=True, text=True, timeout=120, env={**os.environ, "XDG_RUNTIME_DIR": "/tmp"}).stdout
  chunks = re.split(r"^GPU(\d+):\s*$", out.split("Device Properties and Extensions:", 1)[1], flags=re.M)
  text = dict(zip(chunks[1::2], chunks[2::2]))[str(index)]
  values = {}
  for name, value in re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", text, flags=re.M): values.setdefault(name, value)
  return values


@pytest.mark.skipif(shutil.which("vulkaninfo") is None, reason="vulkaninfo (vulkan-tools) is not installed: nothing to compare the caps with")
def test_caps_agree_with_vulkaninfo(dev):
  info, c = _vulkaninfo(dev.index), dev.caps
  num = lambda k: int(info[k], 0)
  assert info["deviceName"] == c.name
  assert (num("maxStorageBufferRange"), num("maxComputeSharedMemorySize"), num("maxComputeWorkGroupInvocations"), num("maxPushConstantsSize"),
          num("minStorageBufferOffsetAlignment"), num("nonCoherentAtomSize"), num("maxPerStageDescriptorStorageBuffers"), num("subgroupSize")) == (
    c.max_storage_buffer_range, c.max_shared_memory, c.max_workgroup_invocations, c.max_push_constants_size,
    c.min_storage_buffer_offset_alignment, c.non_coherent_atom_size, c.max_storage_buffers, c.subgroup_size)
  assert float(info["timestampPeriod"]) == pytest.approx(c.timestamp_period)
  assert (info["shaderFloat16"] == "true", info["storageBuffer16BitAccess"] == "true", info["shaderInt64"] == "true",
          info["shaderSignedZeroInfNanPreserveFloat32"] == "true") == (c.float16, c.storage16, c.int64, c.nan_preserve)


@pytest.mark.skipif(REASON is None and not VALIDATION, reason="the Vulkan validation layer (vulkan-validationlayers) is not installed")
def test_validation_layer_reports_misuse(tmp_path):
  d = vk.Device(validation=True, cache_dir=tmp_path)
  try:
    buf = vk.c_uint64(0)
    d.vk.vkCreateBuffer(d.handle, vk.byref(vk.VkBufferCreateInfo(size=256, usage=0)), None, vk.byref(buf))   # usage must not be 0
    d.vk.vkDestroyBuffer(d.handle, buf.value, None)
    assert any(kind == "error" and "usage" in text for kind, text in d.validation_messages)
  finally:
    d.close()


def test_validation_asked_for_but_missing_warns(tmp_path):
  code = "from minift.backends.vulkan import vk; d = vk.Device(); print('validating', d.instance.validation); d.close()"
  env = {**os.environ, "MINIFT_VK_VALIDATION": "1", "VK_LAYER_PATH": str(tmp_path), "MINIFT_CACHE_DIR": str(tmp_path)}   # no layers there
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert r.returncode == 0, r.stderr
  assert "validating False" in r.stdout
  assert "MINIFT_VK_VALIDATION=1 but the Vulkan validation layer (VK_LAYER_KHRONOS_validation) is not installed" in r.stderr
