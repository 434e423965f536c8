"""docs/extending.md: every worked example runs as written (and stays under 30 lines)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_an_example_per_seam():
    text = DOC.read_text()
    for heading in ("## Add a method", "## Add a task", "## Add a reward", "## Add a trainer"):
        assert heading in text, heading
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    assert len(code.strip().splitlines()) <= 30, "keep each worked example under 30 lines"
    from msdda.evaluation import tasks
    from msdda.sampling import methods
    from msdda.tasks import rewards

    registries = (methods._REGISTRY, tasks.TASKS, rewards._REGISTRY)
    saved = [dict(r) for r in registries]
    try:
        exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": f"extending_{index}"})
    finally:
        for registry, before in zip(registries, saved, strict=True):
            registry.clear()
            registry.update(before)
