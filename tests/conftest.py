import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Never reach for the network: any hub call must fail at once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
