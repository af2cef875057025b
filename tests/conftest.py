"""Shared pytest configuration: the device list, seeding, and marker handling.

* ``device`` fixture: every test taking it runs on ``cpu`` and on ``cuda``; the
  cuda case carries the ``cuda`` marker and is skipped cleanly without a GPU.
* ``slow`` and ``zoo`` tests are deselected unless the ``-m`` expression names
  them.
* ``FUSED_BN_EMULATED_CUDA=1``: the run goes through our CUDA glue and kernels
  on the emulated GPU (tests/emulated_cuda.py): fused_bn's ops on CPU tensors
  are served by them, the ``cuda`` cases are deselected (they need a real
  GPU), and each test gets its own multiprocessor count and block/thread
  order, drawn from its name (reproducible; shown in a failure's report).
  ``FUSED_BN_EMULATION_VARIANT=asan`` loads the sanitized build.
"""
import hashlib
import os
import tempfile

import pytest
import torch

# torch.compile's caches (FX graph, AOTAutograd) key a graph on its ops' names,
# not on the Python autograd formulas registered for them: a cache warmed by
# an older fused_bn can serve a backward that calls the old op schema. Each
# run compiles into a cache of its own (~6 s more for the suite).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fused_bn-tests-inductor-"))

DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))

EMULATED_CUDA = os.environ.get("FUSED_BN_EMULATED_CUDA", "0") == "1"
# Small counts make shapes of the tests split over several blocks and merge
# partials; 132 is an H200's.
EMULATED_MULTIPROCESSORS = (2, 3, 8, 132)
EMULATED_ORDERS = ("forward", "reverse", "shuffle")
# What the occupancy query answers (threads of resident blocks per
# multiprocessor, which size the grids): 1024 is what the grids aim for, the
# others what heavy kernels get on a GPU (cuda-check's register report).
EMULATED_RESIDENT_THREADS = (1024, 512, 256)


def emulated_device_for(nodeid):
    """(multiprocessor count, block order, seed, resident threads per
    multiprocessor) of a test on the emulated GPU."""
    digest = int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "little")
    return (EMULATED_MULTIPROCESSORS[digest % len(EMULATED_MULTIPROCESSORS)],
            EMULATED_ORDERS[digest // 7 % len(EMULATED_ORDERS)], digest % 100003,
            EMULATED_RESIDENT_THREADS[digest // 31 % len(EMULATED_RESIDENT_THREADS)])


def pytest_configure(config):
    if EMULATED_CUDA:
        import fused_bn  # noqa: F401  (the op schemas the emulated kernels register for)
        import emulated_cuda

        emulated_cuda.build(os.environ.get("FUSED_BN_EMULATION_VARIANT", "default"))
        emulated_cuda.enable(True)


def pytest_report_header(config):
    if EMULATED_CUDA:
        return ["fused_bn: CPU tensors run our CUDA kernels on the emulated GPU "
                f"({os.environ.get('FUSED_BN_EMULATION_VARIANT', 'default')} build)"]
    return []


@pytest.fixture(autouse=True)
def _emulated_device(request):
    if EMULATED_CUDA:
        import emulated_cuda

        multiprocessors, order, seed, resident = emulated_device_for(request.node.nodeid)
        emulated_cuda.configure(multiprocessors, order, seed, resident)
        request.node.user_properties.append(
            ("emulated GPU", f"{multiprocessors} multiprocessors, {order} order, seed {seed}, "
                             f"{resident} resident threads per multiprocessor"))
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr") or ""
    for marker in ("slow", "zoo"):
        if marker not in markexpr:
            kept = [item for item in items if item.get_closest_marker(marker) is None]
            dropped = [item for item in items if item.get_closest_marker(marker) is not None]
            if dropped:
                config.hook.pytest_deselected(items=dropped)
                items[:] = kept
    if EMULATED_CUDA:
        real_gpu = [item for item in items if item.get_closest_marker("cuda") is not None]
        if real_gpu:
            config.hook.pytest_deselected(items=real_gpu)
            items[:] = [item for item in items if item.get_closest_marker("cuda") is None]
    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="CUDA is not available")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip_cuda)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call":
        return
    if EMULATED_CUDA and report.failed:
        for name, value in item.user_properties:
            if name == "emulated GPU":
                report.sections.append(("emulated GPU", value))
