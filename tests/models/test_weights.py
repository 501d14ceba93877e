"""save_weights: tied tensors stored once, and the same bytes from every process."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model

REPO = Path(__file__).resolve().parents[2]

# Eight linear layers sharing the first one's weight: eight aliases in the header metadata,
# whose order the safetensors writer draws from a per-process hash map.
TIED = """
import sys
import torch
from vlp.models.weights import save_weights

class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(9))
        for layer in self.layers[1:]:
            layer.weight = self.layers[0].weight

if __name__ == "__main__":
    save_weights(Tied(), sys.argv[1])
"""


def _save_in_new_process(script: Path, out: Path) -> bytes:
    subprocess.run(
        [sys.executable, str(script), str(out)],
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return out.read_bytes()


@pytest.mark.slow
def test_two_processes_write_identical_bytes_that_load_back(tmp_path: Path) -> None:
    script = tmp_path / "tied.py"
    script.write_text(TIED)
    first = _save_in_new_process(script, tmp_path / "a.safetensors")
    second = _save_in_new_process(script, tmp_path / "b.safetensors")
    assert first == second

    model = runpy.run_path(str(script))["Tied"]()
    reference = model.layers[0].weight.detach().clone()
    with torch.no_grad():
        model.layers[0].weight.zero_()
    load_model(model, str(tmp_path / "a.safetensors"))
    assert torch.equal(model.layers[0].weight, reference)
    assert model.layers[5].weight is model.layers[0].weight
