"""tools/bench.py's step benchmarks (issue #27) on a tiny GPT-2: the breakdown puts each kernel
of a training step in the right class (its matmul FLOPs per class equal the model's, counted
by hand from its shapes), and --separate runs each framework in its own processes."""
import os, statistics, sys
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import bench   # noqa: E402

D, LAYERS, HEADS, VOCAB, TOKENS = 64, 2, 4, 96, 4 * 128   # the step benchmarks' batch: 4 x 128


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
  import torch, transformers
  torch.manual_seed(0)
  folder = tmp_path_factory.mktemp("tiny-gpt2")
  transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=128)).save_pretrained(folder)
  return str(folder)


def _by_class(rows):
  return {r["kernel_class"]: r for r in rows if r["task"] == "breakdown"}


def test_breakdown_classes_match_the_models_matmul_flops(tiny_gpt2):
  rows = []
  bench.bench_breakdown(rows, "numpy", 1, model=tiny_gpt2)
  c = _by_class(rows)
  per_layer = D * 3 * D + D * D + D * 4 * D + 4 * D * D   # c_attn, attn.c_proj, c_fc, mlp.c_proj
  forward = 2 * TOKENS * (LAYERS * per_layer + D * VOCAB)   # and the tied LM head
  assert c["matmul forward"]["gflop"] == pytest.approx(forward / 1e9, rel=1e-9)
  # backward: every input gradient but the first c_attn's (the embeddings are frozen)
  assert c["matmul input-gradient"]["gflop"] == pytest.approx((forward - 2 * TOKENS * D * 3 * D) / 1e9, rel=1e-9)
  assert "matmul weight-gradient" not in c   # LoRA: no frozen weight gets a gradient
  modules = LAYERS * 2   # c_attn and attn.c_proj: x@A, @B forward; dB, dA, and g@B, @A back (not into layer 0)
  assert c["matmul LoRA"]["kernels"] == 6 * modules - 1
  assert c["attention forward"]["kernels"] == c["attention backward"]["kernels"] == LAYERS
  assert c["optimizer"]["kernels"] == 2 * modules   # AdamW's m, v, p of each A and B in one loop
  step = c["step"]
  assert step["ms"] == pytest.approx(sum(r["ms"] for k, r in c.items() if k != "step"), rel=1e-6)
  assert step["floor_ms"] > 0 and step["x_floor"] > 0


def test_breakdown_of_full_fine_tuning_has_weight_gradients(tiny_gpt2):
  rows = []
  bench.bench_breakdown(rows, "numpy", 1, model=tiny_gpt2, full_ft=True)
  c = _by_class(rows)
  forward = c["matmul forward"]["gflop"]
  assert forward == pytest.approx(2 * TOKENS * (LAYERS * 12 * D * D + D * VOCAB) / 1e9, rel=1e-9)
  assert c["matmul weight-gradient"]["gflop"] == pytest.approx(forward, rel=1e-9)   # one per weight, the LM head's too
  assert c["matmul input-gradient"]["gflop"] == pytest.approx(forward, rel=1e-9)    # the embeddings train: all the way down
  assert "matmul LoRA" not in c


def test_separate_processes_alternate_and_report_per_step_times(tiny_gpt2, monkeypatch):
  monkeypatch.setenv("MINIFT_DEVICE", "numpy")   # bench.main sets it: restored after the test
  rows = bench.main(["--task", "lora_step", "--model", tiny_gpt2, "--separate", "--repeat", "2"])
  (r,) = rows
  assert r["separate"] and len(r["minift_steps_s"]) == len(r["ref_steps_s"]) == 6
  assert r["minift_ms"] == pytest.approx(1e3 * statistics.median(r["minift_steps_s"]))
  assert r["ref_ms"] == pytest.approx(1e3 * statistics.median(r["ref_steps_s"]))
  assert all(t > 0 for t in r["minift_steps_s"] + r["ref_steps_s"]) and r["peak_rss_mb"] > 0 and r["ref_peak_rss_mb"] > 0


def test_full_step_in_one_process_and_with_moments_paged(tiny_gpt2, monkeypatch):
  """The default (in-process) comparison, also with AdamW's moments paged through the sharder:
  rows for both, each with the peak RSS of its own processes."""
  from minift.sharder import active
  monkeypatch.setenv("MINIFT_DEVICE", "numpy")
  rows = bench.main(["--task", "full_step", "--model", tiny_gpt2, "--repeat", "1"])
  assert [("moments paged" in r["shape"]) for r in rows] == [False, True]
  assert all(r["minift_ms"] > 0 and r["ref_ms"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
  assert active() is None   # the paged run's sharder is closed
