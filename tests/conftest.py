"""Test-wide JAX settings: CPU, strict rank promotion, float32 by default."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole session: the xdist workers and the
# subprocesses the tests start (which inherit the environment) compile the same tiny models many
# times, and compilation is most of the suite's time on CPU. Kept between runs under .cache/.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Cheaper LLVM code generation for the tests: about 40% less compile time on CPU, where the
# suite's programs are tiny and compile far longer than they run. XLA's HLO passes are unchanged,
# but float results can differ in the last bits from an optimised build, so runs that a test
# compares bit for bit must all see these flags: subprocesses inherit them, and those that fake
# devices append to them (os.environ["XLA_FLAGS"] += ...).
# One compute thread per process (`--xla_cpu_multi_thread_eigen=false`): `make test` runs 2 xdist
# workers, plus the subprocesses some tests start, on 2 cores, so intra-op threads would only
# contend; and the study's spawned workers run with the same flag (ea_jax.study.runner
# .worker_environment), so with it here their compiled programs and the in-process ones share
# cache entries and numerics.
TEST_XLA_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_multi_thread_eigen=false"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# The allocator setting every entry point makes (ea_jax.runtime.keep_freed_memory): without it
# XLA's freed step buffers are unmapped and faulted in again on every call.
from ea_jax import runtime  # noqa: E402

runtime.keep_freed_memory()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# Fixtures that train something expensive. Under `--dist loadgroup` (`make test`) every test
# using one of them runs in the same worker; they are session-scoped, because a worker can run
# other modules' tests between a group's tests, and a module-scoped fixture would then be torn
# down and trained again (measured: the CLI's one-process run trained twice, 77 s in all).
_SHARED_FIXTURES = ("trained", "trained_square", "tiny_sweep", "one_process", "campaign")


# tryfirst: pytest-xdist's worker reads the xdist_group marks in its own collection hook (it
# appends the group to each node id), so the marks must be added before it runs. Without it the
# groups were silently ignored and each shared fixture was built in both workers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    shared = [name for name in _SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
    if shared and item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared[0]}"))
