"""The NumPy backend's compiled C loops (minift/backends/numpy/cloops.py): accuracy of the polynomial exp and
tanh against float64, special values against NumPy, which kernels run in C, the disk cache and
its pruning, and the fallback to NumPy when there is no working compiler. The op suite itself also runs on the
numpy-c device (conftest.py)."""
import logging, os
import numpy as np
import pytest
from minift.backends.numpy import cloops, parallel
from minift import Tensor
from minift.helpers import prune_cache, touch_cache
from minift.schedule import create_schedule


@pytest.fixture(autouse=True)
def _needs_a_compiler():
  if not cloops.compiler.available: pytest.fail(f"no working C compiler (cc, or $CC): {cloops.compiler.failed}")


@pytest.fixture
def force_c(monkeypatch):
  monkeypatch.setattr(cloops, "C_FROM", 0)


def ulp_error(got, want64):
  """|got - want| in units of the float32 spacing at want (finite values only)."""
  with np.errstate(over="ignore"): want32 = want64.astype(np.float32)
  fin = np.isfinite(want32)
  spacing = np.maximum(np.spacing(np.abs(want32[fin])), np.spacing(np.float32(0))).astype(np.float64)
  return np.abs(got[fin].astype(np.float64) - want64[fin]) / spacing


GRID = np.concatenate([np.linspace(-110, 95, 400_001), np.linspace(-1, 1, 200_001),
                       np.geomspace(1e-30, 1, 20_000), -np.geomspace(1e-30, 1, 20_000)]).astype(np.float32)


@pytest.mark.parametrize("name, fn, ref, max_ulp", [
  ("exp", Tensor.exp, np.exp, 1.5),        # NumPy's own float32 exp is within 2.5 ulp here
  ("tanh", Tensor.tanh, np.tanh, 2.5),
])
def test_polynomials_against_float64(force_c, name, fn, ref, max_ulp):
  with np.errstate(over="ignore"):
    want = ref(GRID.astype(np.float64))
  got = fn(Tensor(GRID)).numpy()
  err = ulp_error(got, want)
  assert err.max() <= max_ulp, f"{name}: {err.max():.2f} ulp at x={GRID[np.isfinite(want.astype(np.float32))][err.argmax()]}"
  with np.errstate(over="ignore"):
    assert np.array_equal(np.isinf(got), np.isinf(want.astype(np.float32))), f"{name}: overflow to inf at other inputs"


SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, 1e-20, -1e-20, 0.3999, 0.4001, 1.0, -1.0, 9.0, 9.02, -9.02,
                    20.0, 87.0, 88.72, 88.73, 89.0, 100.0, -87.0, -100.0, -103.9, -104.0, -110.0,
                    np.inf, -np.inf, np.nan, -np.nan], np.float32)


@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid", "log", "sqrt", "reciprocal", "relu", "neg"])
def test_special_values_match_numpy(force_c, name):
  x = np.concatenate([SPECIAL, -SPECIAL])
  got = getattr(Tensor(x), name)().numpy()
  with np.errstate(all="ignore"):
    want = {"exp": np.exp, "tanh": np.tanh, "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "log": np.log, "sqrt": np.sqrt,
            "reciprocal": np.reciprocal, "relu": lambda v: np.where(v > 0, v, 0), "neg": np.negative}[name](x).astype(np.float32)
  assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: NaN at {x[np.isnan(got) != np.isnan(want)]}"
  ok = ~np.isnan(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=3e-7, atol=1e-44, err_msg=name)


def test_max_and_sum_propagate_nan(force_c):
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  x[1, 3], x[2, 0] = np.nan, np.inf
  y = np.full((4, 6), 5.0, np.float32)
  np.testing.assert_array_equal(Tensor(x).maximum(Tensor(y)).numpy(), np.maximum(x, y))
  np.testing.assert_array_equal(Tensor(x).max(-1).numpy(), x.max(-1))
  np.testing.assert_array_equal(Tensor(x).sum(-1).numpy(), x.sum(-1))


def test_big_reductions_in_chunks_and_column_blocks(monkeypatch):
  """A reduction to one value of more than 2 CHUNKs sums chunk by chunk on every core, and one
  over leading axes COLUMNS outputs at a time: each equals float64 (sums) or NumPy (max, NaN
  and inf included), and 1 or 3 threads give the same bits."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((700, 3, 130)).astype(np.float32)   # 273000 elements: 4 chunks
  y = x.copy()
  y[650, 2, 7], y[3, 0, 100] = np.nan, np.inf
  cases = {
    "sum of squares, sqrt after": (lambda t: (t * t).sum().sqrt(), lambda a: np.sqrt((a.astype(np.float64) ** 2).sum())),
    "sum of a strided view": (lambda t: t[:, 1].sum(), lambda a: a[:, 1].astype(np.float64).sum()),
    "sum of a permuted view": (lambda t: t.permute(2, 0, 1).sum(), lambda a: a.astype(np.float64).sum()),
    "max": (lambda t: t.max(), lambda a: a.max()),
    "max, a NaN and an inf in it": (lambda t: t.max(), lambda a: a.max(), y),
    "sum over leading axes": (lambda t: (t * 2).sum((0, 1)), lambda a: (a.astype(np.float64) * 2).sum((0, 1))),
    "sum over leading axes, NaN in a column": (lambda t: t.sum(0), lambda a: a.astype(np.float64).sum(0), y),
    "max over leading axes, NaN in a column": (lambda t: t.max((0, 1)), lambda a: a.max((0, 1)), y),
  }
  for what, (fn, ref, *data) in cases.items():
    a = data[0] if data else x
    kernels = _kernels(fn(Tensor(a)))
    assert cloops.prepare(kernels, lambda k: [t.dtype for t in k.inputs])[-1] is not None, what
    got = {}
    for threads in ("1", "3"):
      monkeypatch.setenv("MINIFT_THREADS", threads)
      monkeypatch.setattr(parallel, "PARTS_FROM", 1)
      got[threads] = fn(Tensor(a)).numpy()
    assert np.array_equal(got["1"], got["3"], equal_nan=True), what
    np.testing.assert_allclose(got["1"], ref(a), rtol=2e-6, err_msg=what)


def _kernels(t):
  return create_schedule([t.lazydata])


def test_what_runs_in_c(force_c):
  a, b = Tensor(np.ones((8, 16), np.float32)), Tensor(np.ones((16, 4), np.float32))
  h = Tensor(np.ones((8, 16), np.float16))
  cases = {
    "elementwise": ((a * 2 + 1).exp(), True),
    "row reduction": (a.sum(-1), True),
    "matmul epilogue": ((a @ b).relu(), True),
    "plain matmul (BLAS writes it)": (a @ b, False),
    "float16": (h * 2, False),
    "reduction over the leading axis": (a.sum(0), True),
    "reduction over leading and trailing axes at once": (a.reshape(2, 4, 16).sum((0, 2)), False),
    "reduction to one value": ((a * a).sum(), True),
  }
  for what, (t, in_c) in cases.items():
    kernels = _kernels(t)
    assert (cloops.prepare(kernels, lambda k: [x.dtype for x in k.inputs])[-1] is not None) == in_c, what


def test_c_equals_numpy_on_a_training_step(monkeypatch):
  """A tiny GPT-2 LoRA step: the C loops give NumPy's losses and gradients (to ~1 ulp per op)."""
  from tiny_gpt import init_weights, block_minift
  weights, _ = init_weights(vocab=8, ctx=8, d=64, heads=4, layers=1)
  x0 = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
  def step():
    p = {k: Tensor(v, requires_grad=True) for k, v in weights.items()}
    x = Tensor(x0, requires_grad=True)
    out = block_minift(p, 0, x, 4)
    loss = (out * out).mean()
    loss.backward()
    return loss.numpy(), x.grad.numpy(), [p[k].grad.numpy() for k in sorted(p) if p[k].grad is not None]
  monkeypatch.setattr(cloops, "C_FROM", 0)
  ran = []
  real = cloops.prepare
  def recording(ks, d, *size):
    loops = real(ks, d, *size)
    ran.extend(loop and loop.name for loop in loops or ())   # (None: MINIFT_CLOOPS=0)
    return loops
  monkeypatch.setattr(cloops, "prepare", recording)
  with_c = step()
  assert sum(n is not None for n in ran) >= len(ran) // 2, f"only {sum(n is not None for n in ran)} of {len(ran)} kernels ran in C"
  monkeypatch.setenv("MINIFT_CLOOPS", "0")
  numpy_only = step()
  np.testing.assert_allclose(with_c[0], numpy_only[0], rtol=1e-6)
  np.testing.assert_allclose(with_c[1], numpy_only[1], rtol=1e-4, atol=1e-7)
  for g_c, g_np in zip(with_c[2], numpy_only[2]): np.testing.assert_allclose(g_c, g_np, rtol=1e-4, atol=1e-6)


def test_loops_cut_into_parts_give_the_same_bits(monkeypatch, force_c):
  """A big kernel runs its outermost loop in parts on worker threads. A GPT-2 block's forward
  and backward (reductions, matmul epilogues, cats, attention) and a 1-D loop cut at a seam give
  the same bits with 1 or 3 threads; run part by part, last part first, each part of a rendered
  loop writes only its own rows of the output."""
  from tiny_gpt import init_weights, block_minift
  weights, _ = init_weights(vocab=8, ctx=8, d=64, heads=4, layers=1)
  x0 = np.random.default_rng(1).standard_normal((3, 40, 64)).astype(np.float32)
  def step():
    p = {k: Tensor(v, requires_grad=True) for k, v in weights.items()}
    x = Tensor(x0, requires_grad=True)
    loss = (block_minift(p, 0, x, 4) ** 2).mean()
    loss.backward()
    flat = x.grad.reshape(-1)
    joined = Tensor.cat([flat[:1000] * 2, flat[:777].exp()])   # one loop, cut in two pieces at the seam
    return [loss.numpy(), x.grad.numpy(), joined.numpy()] + [p[k].grad.numpy() for k in sorted(p) if p[k].grad is not None]
  monkeypatch.setattr(parallel, "PARTS_FROM", 1)
  monkeypatch.setenv("MINIFT_THREADS", "1")
  want = step()
  monkeypatch.setenv("MINIFT_THREADS", "3")
  threaded = step()
  split = []
  from minift.backends.numpy.attention import attention_functions
  attention = attention_functions()   # their parts are blocks of queries and (batch, kv head) pairs, not rows
  def part_by_part(fn, out, args, outer, work):
    # the outermost loop runs over the output's leading rows; attention's does not, nor that of a
    # reduction to one value in chunks (its parts write partial sums)
    rows = out.reshape(outer, -1).view(np.uint8) if fn not in attention and out.size % outer == 0 and out.size >= outer else None
    cuts = [0, outer // 3, outer] if outer > 1 else [0, outer]
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
      before = rows.copy() if rows is not None else None
      fn(parallel.pack([out.ctypes.data, *args]), lo, hi)
      if rows is None: continue
      changed = (rows != before).any(1)
      assert not changed[:lo].any() and not changed[hi:].any(), f"part [{lo}, {hi}) of {outer} wrote outside its rows"
    split.append(outer)
  monkeypatch.setattr(parallel, "call_in_parts", part_by_part)
  by_parts = step()
  assert sum(n > 1 for n in split) > 10, split
  for got_threads, got_parts, w in zip(threaded, by_parts, want):
    assert np.array_equal(got_threads, w) and np.array_equal(got_parts, w)


def test_ctrl_c_waits_for_the_other_parts(monkeypatch, force_c):
  """A Ctrl-C (SIGINT) while loops run in parts is raised once the running one is done (its
  parts write into the output, which the unwinding would free under them): every result
  finished before it is whole, and the workers run the next loop as before."""
  import signal, threading
  monkeypatch.setattr(parallel, "PARTS_FROM", 1)
  monkeypatch.setenv("MINIFT_THREADS", "2")
  x = Tensor(np.full((4096, 1024), 0.5, np.float32))
  want = (x.exp() * 3).numpy()   # compiled, and the workers started
  timer = threading.Timer(0.01, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
  got = []
  with pytest.raises(KeyboardInterrupt):
    timer.start()
    for _ in range(10000): got.append((x.exp() * 3).numpy())
  assert all(np.array_equal(g, want) for g in got)
  assert np.array_equal((x.exp() * 3).numpy(), want)


def test_parts_run_in_a_forked_child(monkeypatch, force_c):
  """A forked child has none of its parent's worker threads: they are started again there (the
  child has a thread beside its own; without that the caller would run every part itself), and
  the child's loops in parts give the parent's bits."""
  import os, time
  monkeypatch.setattr(parallel, "PARTS_FROM", 1)
  monkeypatch.setenv("MINIFT_THREADS", "2")
  x = Tensor(np.linspace(-3, 3, 64 * 1024, dtype=np.float32).reshape(64, 1024))
  want = (x.exp() * 3).numpy()   # the workers started in this process
  pid = os.fork()
  if pid == 0:
    same = np.array_equal((x.exp() * 3).numpy(), want)
    os._exit(1 if not same else 2 if len(os.listdir("/proc/self/task")) < 2 else 0)
  for _ in range(600):   # (a child stuck waiting for threads it does not have would hang the suite)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done: break
    time.sleep(0.1)
  else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child did not finish in 60 s")
  assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_bad_thread_count_is_an_error_naming_the_variable(monkeypatch, force_c, value):
  monkeypatch.setenv("MINIFT_THREADS", value)
  with pytest.raises(ValueError, match="MINIFT_THREADS"):
    (Tensor(np.ones((4, 8), np.float32)) * 2).numpy()


def test_disk_cache_is_used_by_a_new_process(tmp_path, monkeypatch, force_c):
  monkeypatch.setenv("MINIFT_CACHE_DIR", str(tmp_path))
  x = np.linspace(-3, 3, 40, dtype=np.float32).reshape(5, 8)
  want = np.tanh(x * 3 + 1)
  fresh = cloops.Compiler(cloops.PRELUDE)
  monkeypatch.setattr(cloops, "compiler", fresh)
  np.testing.assert_allclose((Tensor(x) * 3 + 1).tanh().numpy(), want, rtol=1e-6)
  assert list((tmp_path / "c").glob("*.so")), "nothing was written to the cache"
  again = cloops.Compiler(cloops.PRELUDE)   # a new process: knows nothing, must not compile
  again._flags = fresh.flags
  monkeypatch.setattr(again, "build", lambda sources: pytest.fail(f"compiled {len(sources)} kernels that the cache holds"))
  monkeypatch.setattr(cloops, "compiler", again)
  np.testing.assert_allclose((Tensor(x) * 3 + 1).tanh().numpy(), want, rtol=1e-6)
  assert again.functions, "the kernel did not run from the cached library"


@pytest.mark.parametrize("why", ["compiler fails", "cache unwritable"])
def test_a_failing_compiler_falls_back_to_numpy(tmp_path, monkeypatch, force_c, why):
  if why == "compiler fails": monkeypatch.setenv("CC", "/bin/false")
  else: (tmp_path / "c").write_text("a file where the cache folder should be")
  monkeypatch.setenv("MINIFT_CACHE_DIR", str(tmp_path))
  broken = cloops.Compiler(cloops.PRELUDE)
  monkeypatch.setattr(cloops, "compiler", broken)
  x = np.linspace(-3, 3, 40, dtype=np.float32)
  seen = []
  handler = logging.Handler(logging.WARNING)   # not DEBUG=1's line of compiler flags
  handler.emit = lambda record: seen.append(record.getMessage())
  logging.getLogger("minift").addHandler(handler)
  try: got = (Tensor(x) * 2).exp().numpy()
  finally: logging.getLogger("minift").removeHandler(handler)
  np.testing.assert_allclose(got, np.exp(x * 2), rtol=1e-6)
  assert not broken.available
  culprit = "/bin/false" if why == "compiler fails" else str(tmp_path / "c")
  assert len(seen) == 1 and culprit in seen[0] and "NumPy" in seen[0], seen   # one warning, naming the culprit


def test_rendered_once_per_structure(force_c, monkeypatch):
  """An eager call schedules the same kernels again: they are looked up, not rendered again;
  kernels that differ only in a constant's sign (x * 0.0, x * -0.0: -0.0 == 0.0 in Python) are
  not mixed up."""
  renders = []
  real = cloops.render
  monkeypatch.setattr(cloops, "render", lambda k, d: renders.append(k) or real(k, d))
  monkeypatch.setattr(cloops, "_rendered", {})
  x = np.array([-0.0, 0.0, 1.5, -2.0] * 3, np.float32).reshape(3, 4)
  names = []
  for data in (x, x * 3):
    kernels = _kernels((Tensor(data) * 2 + 1).exp())
    names.append(cloops.prepare(kernels, lambda k: [i.dtype for i in k.inputs])[-1].name)
  assert names[0] == names[1] and len(renders) == 1
  for zero in (0.0, -0.0):   # a CONST each; their kernels have one structure but for the sign
    np.testing.assert_array_equal(np.signbit((Tensor(x) * zero).numpy()), np.signbit(x * np.float32(zero)), err_msg=repr(zero))


def test_a_cat_loop_is_cut_at_its_seams(force_c, monkeypatch):
  """A cat (masked loads along the innermost axis) renders that loop once per piece, each piece
  free of conditions so that the compiler vectorises it; values equal NumPy's, -0.0 included."""
  sources = []
  real = cloops.render
  monkeypatch.setattr(cloops, "render", lambda k, d: sources.append(real(k, d)[1]) or real(k, d))
  monkeypatch.setattr(cloops, "_rendered", {})
  rng = np.random.default_rng(0)
  a, b, c = (rng.standard_normal((3, n)).astype(np.float32) for n in (5, 7, 4))
  a[0, 0], b[1, 2] = -0.0, -0.0   # -0.0 in the first two parts
  got = Tensor.cat([Tensor(a) * 2, Tensor(b) * 3, Tensor(c).exp()], dim=1).numpy()
  want = np.concatenate([a * 2, b * 3, np.exp(c)], 1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.signbit(got[0, 0]) and np.signbit(got[1, 5 + 2]), "a cat turned -0.0 into +0.0"
  src = next(s for s in sources if "out[" in s and "i1 = 12" in s)
  assert [l.strip() for l in src.splitlines() if l.strip().startswith("for (long i1")] == \
         ["for (long i1 = 0; i1 < 5; i1++) {", "for (long i1 = 5; i1 < 12; i1++) {", "for (long i1 = 12; i1 < 16; i1++) {"]
  assert "?" not in src, src


def test_cache_pruning_drops_the_least_recently_used(tmp_path, monkeypatch):
  for i, name in enumerate("abc"):
    (tmp_path / f"{name}.so").write_bytes(b"\0" * 700_000)
    (tmp_path / f"{name}.txt").write_text("k_" + name)
    os.utime(tmp_path / f"{name}.so", (1000 + i, 1000 + i))   # built a, then b, then c
  touch_cache(tmp_path / "a.so")                              # a was loaded since
  monkeypatch.setenv("MINIFT_CACHE_MAX_MB", "2")              # 2.1 MB held: one library must go
  assert prune_cache(tmp_path, "*.so", companions=(".txt",)) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.so", "a.txt", "c.so", "c.txt"]
  monkeypatch.setenv("MINIFT_CACHE_MAX_MB", "0.001")           # the newest stays, whatever the limit
  assert prune_cache(tmp_path, "*.so", companions=(".txt",)) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.so", "a.txt"]
  monkeypatch.setenv("MINIFT_CACHE_MAX_MB", "lots")
  with pytest.raises(ValueError, match="MINIFT_CACHE_MAX_MB"): prune_cache(tmp_path, "*.so")


def test_a_full_cache_is_pruned_and_kernels_still_run(tmp_path, monkeypatch, force_c):
  monkeypatch.setenv("MINIFT_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("MINIFT_CACHE_MAX_MB", "0.001")   # smaller than one library
  fresh = cloops.Compiler(cloops.PRELUDE)
  monkeypatch.setattr(cloops, "compiler", fresh)
  x = np.linspace(-3, 3, 40, dtype=np.float32).reshape(5, 8)
  np.testing.assert_allclose((Tensor(x) * 3 + 1).tanh().numpy(), np.tanh(x * 3 + 1), rtol=1e-6)
  np.testing.assert_allclose((Tensor(x) * 5 - 2).exp().numpy(), np.exp(x * 5 - 2), rtol=1e-6)
  assert len(list((tmp_path / "c").glob("*.so"))) == 1, "the older library was not pruned"
  assert len(fresh.functions) == 2, "a kernel did not run in C"
  # another process whose index still names the pruned library: NumPy runs the kernel
  later = cloops.Compiler(cloops.PRELUDE)
  later._flags = fresh.flags
  later.index = {n: tmp_path / "c" / "gone.so" for n in fresh.functions}
  monkeypatch.setattr(later, "build", lambda sources: None)
  monkeypatch.setattr(cloops, "compiler", later)
  np.testing.assert_allclose((Tensor(x) * 3 + 1).tanh().numpy(), np.tanh(x * 3 + 1), rtol=1e-6)
  assert not later.functions and not later.index
