"""Generates text from a trained workdir: python sample.py --workdir=DIR --prompt="ROMEO:".

KV cache for DPA and rational EA, the constant-size recurrent state for square-kernel EA
(`--decode=auto`; `kv_cache` / `recurrent` force one). Prints the text, then the decoding state,
the number of tokens and tokens/s (measured on a second, compiled run). See ea_jax/generate.py.
"""

import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
flags.DEFINE_string("prompt", "\n", "Text the generation continues (characters of the corpus).")
flags.DEFINE_integer("num_tokens", 500, "How many tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 1, "Sequences generated at once (the first is printed).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("decode", "auto", ["auto", "kv_cache", "recurrent"], "Decoding state.")
flags.DEFINE_integer(
  "window",
  None,
  "Restart the context at this many tokens (default: the "
  "training context; 0 = never, for rope/none positions).",
)
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from ea_jax import generate, runtime

  runtime.keep_freed_memory()

  try:
    model = generate.load(FLAGS.workdir, FLAGS.step)
    out = generate.generate(
      model,
      FLAGS.prompt,
      FLAGS.num_tokens,
      rng=jax.random.key(FLAGS.seed),
      decode=FLAGS.decode,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      batch_size=FLAGS.batch_size,
      window=FLAGS.window,
    )
  except (ValueError, FileNotFoundError) as e:  # bad flags or workdir: one line, exit 1
    sys.exit(f"sample.py: {e}")
  print(out.text[0] if out.text else out.tokens[0].tolist())
  print(
    f"\n[{out.decode}, step {model.step}: {FLAGS.batch_size} x {FLAGS.num_tokens} tokens in "
    f"{out.seconds:.2f} s, {out.tokens_per_sec:.0f} tokens/s]"
  )


if __name__ == "__main__":
  app.run(main)
