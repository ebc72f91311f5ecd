"""Every Python example in docs/secure-aggregation.md runs as written and gives what its comments say."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "secure-aggregation.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_its_two_examples():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the simulation example writes sim-ids/ into the working directory
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"{DOC.name} example {index + 1}", "exec"), namespace)
    if index == 0:
        result = namespace["result"]
        assert np.allclose(result.mean_delta(), 14 / 600, atol=1e-6)  # (100*0.01 + 200*0.02 + 300*0.03) / 600
        figures = result.figures
        assert (figures.steps, figures.num_samples) == (6, 600)
        assert abs(figures.loss - 1100 / 600) < 1e-4 and abs(figures.weight_sum - 600) < 1e-3
    else:
        assert namespace["members_at_server"] == namespace["site"].members
        assert capsys.readouterr().out.startswith("site-1 3 ")
