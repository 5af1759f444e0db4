import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Never reach for the network: any hub call must fail at once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# jieba-c's built dictionary (data_prep.languages.cache_dir): one cache for the whole run (every
# pytest-xdist worker and subprocess), outside the user's ~/.cache.
os.environ.setdefault("AMBERT_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"ambert-test-cache-{os.getuid()}"))


# Under pytest-xdist (launchers/test.sh: `-n 2 --dist loadfile`, a file a unit) the longest files go
# first, so that no worker is left with one of them while the other has finished: these took 40-160 s
# each of a ~1000 s serial run. A serial run keeps pytest's order.
_LONGEST_FIRST = (
    "test_pretrain.py", "test_resume.py", "test_pretrain_audit.py", "test_startup_agreement.py",
    "test_study_plot_cli.py", "test_phrases.py", "test_launchers.py", "test_diverged.py", "test_data_prep_en.py",
    "test_data_prep_zh.py", "test_data_prep_scaleout.py", "test_finetune_span.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


_WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@pytest.fixture(autouse=True)
def _signal_handlers_are_given_back():
    """A test (or the in-process entry point it calls: pretrain.main, build.main) that leaves a signal
    handler of its own installed fails here, and the handler is put back: left behind, a SIGTERM handler
    that only sets a flag made every process the test process forked later ignore Pool.terminate()."""
    before = {sig: signal.getsignal(sig) for sig in _WATCHED_SIGNALS}
    yield
    changed = [sig for sig, handler in before.items() if signal.getsignal(sig) is not handler]
    for sig in changed:
        signal.signal(sig, before[sig])
    if changed:
        pytest.fail(f"the test left its own handler for {', '.join(signal.Signals(s).name for s in changed)} installed")


@pytest.fixture(autouse=True)
def _environment_is_given_back():
    """Each test leaves os.environ as it found it. In-process entry points fill in variables for their
    own start (pretrain.main: LOCAL_RANK, MASTER_ADDR, MASTER_PORT, TORCH_EXTENSIONS_DIR...), libraries
    set some as they are imported; left behind, they reached the next test file of this process (under
    pytest-xdist, any file: a launcher template test found another test's MASTER_PORT)."""
    saved = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}
    yield
    for name in [n for n in os.environ if n not in saved and n != "PYTEST_CURRENT_TEST"]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
