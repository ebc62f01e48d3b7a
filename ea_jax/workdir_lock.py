"""One trainer per workdir: an exclusive `fcntl` lock on `workdir/.lock` naming its holder.

The kernel releases the lock when its process dies, even by `kill -9`, so a lock file left by
a dead trainer is stale by construction: the next trainer takes it over (and says whose it
was). A live holder makes a second trainer fail at once with the holder's host and pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from absl import logging

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live process trains in this workdir."""


class WorkdirLock:
  """Context manager holding the workdir's lock; `holder` is what the lock file says."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirLockedError(
        f"{os.path.dirname(self.path)} is in use by another trainer (pid {holder.get('pid')} "
        f"on {holder.get('host')}, since {holder.get('since')}); wait for it or stop it, or "
        f"use another --workdir"
      ) from None
    previous = _read(fd)
    if previous:
      logging.warning(
        "taking over the lock of a trainer that is gone (pid %s on %s)",
        previous.get("pid"),
        previous.get("host"),
      )
    os.ftruncate(fd, 0)
    os.pwrite(
      fd,
      json.dumps(
        {
          "host": socket.gethostname(),
          "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
      ).encode(),
      0,
    )
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # a clean exit leaves no holder behind
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _read(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode()
    return json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {}
