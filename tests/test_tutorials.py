"""Every tutorial notebook runs from top to bottom, offline, on the default model."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


def test_the_tutorials_are_there():
    names = [path.stem for path in TUTORIALS]
    assert names == [
        "01_getting_started",
        "02_ablation_and_dla",
        "03_activation_patching",
        "04_path_patching",
        "05_causal_tracing",
        "06_attribution_and_discovery",
    ], names


@pytest.mark.real
@pytest.mark.parametrize("path", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "tutorials are committed without outputs"
    )
    client = NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        # one thread per kernel, like the rest of the suite's real-model tests
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert errors == []
