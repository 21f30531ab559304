"""Test configuration: make the tiny test DiTs importable and keep Dynamo state per test."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _runtime_globals() -> dict:
    """What sparsify installs process-wide, cheap to read: installed sites, SDPA patch users, graph-mode sites, the
    calibrator's observer and selection log, a merged block's tokens."""
    from sparsify.passes import install, rewrite
    from sparsify.runtime import STATE

    return {"sites": {sid: st.path for sid, st in STATE.sites.items()}, "sdpa": install._USERS,
            "graph": dict(rewrite.GRAPH_SITES), "observer": STATE.observer, "selection_log": STATE.selection_log,
            "merged": STATE.merged}


def _leaks(before: dict, after: dict) -> list[str]:
    """What `after` holds that `before` did not, in words."""
    out = []
    new_sites = sorted(path for sid, path in after["sites"].items() if sid not in before["sites"])
    if new_sites:
        shown = ", ".join(new_sites[:4]) + (", ..." if len(new_sites) > 4 else "")
        out.append(f"{len(new_sites)} installed sites ({shown})")
    if after["sdpa"] > before["sdpa"]:
        out.append(f"F.scaled_dot_product_attention patched ({after['sdpa'] - before['sdpa']} more users)")
    if set(after["graph"]) - set(before["graph"]):
        out.append("graph-mode sites registered for the inductor pass")
    for key in ("observer", "selection_log", "merged"):
        if after[key] is not None and after[key] is not before[key]:
            out.append(f"runtime STATE.{key} set")
    return out


def _restore(before: dict) -> None:
    """Put sparsify's process-wide state back to `before` (the leaking model itself stays sparsified)."""
    from sparsify.passes import install, rewrite
    from sparsify.runtime import STATE

    for sid in [sid for sid in STATE.sites if sid not in before["sites"]]:
        del STATE.sites[sid]
    while install._USERS > before["sdpa"]:
        install._unpatch_sdpa()
    for mid in [mid for mid in rewrite.GRAPH_SITES if mid not in before["graph"]]:
        del rewrite.GRAPH_SITES[mid]
    if before["graph"] == {} and rewrite.GRAPH_SITES == {}:
        rewrite.uninstall_inductor_pass()
    STATE.observer, STATE.selection_log, STATE.merged = before["observer"], before["selection_log"], before["merged"]
    STATE.geometry = STATE.geometry_owner = None


def _check_no_leak(before: dict, where: str) -> None:
    leaks = _leaks(before, _runtime_globals())
    if leaks:
        _restore(before)
        pytest.fail(f"{where} left sparsify's global state behind: {'; '.join(leaks)}. Unsparsify in a `finally` "
                    "(or the fixture's teardown); the state was reset so that later tests run clean", pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _no_leak_per_module(request):
    """Fail a module whose tests or module-scoped fixtures leave a model sparsified (checked once its fixtures are
    torn down), and reset the state, so that the next module starts clean."""
    before = _runtime_globals()
    yield
    _check_no_leak(before, f"module {request.module.__name__}")


@pytest.fixture(autouse=True)
def _no_leak_per_test(request):
    """Fail (at teardown) a test that leaves a model sparsified, SDPA patched or a calibration hook set, beyond what
    its module-scoped fixtures installed before it ran, and reset that state."""
    before = _runtime_globals()
    yield
    _check_no_leak(before, f"test {request.node.nodeid}")


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1, for the rendezvous of spawned gloo process groups."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: threads add nothing there, and on a busy CPU
    they cost up to 50x (OpenMP oversubscription). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
