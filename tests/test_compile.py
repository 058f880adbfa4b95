"""``--compile``: the training steps run through torch.compile, and nothing else changes.

The compiled network must be the one the objective calls (so the flag is not silently ignored),
train to the same weights as the plain network up to float rounding, save the same weight names,
and leave the EMA copy uncompiled.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from unnoise.cli.main import main
from unnoise.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = ["train", "toy", "--model", "tiny", "--steps", "4", "--batch-size", "64"]


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_training_matches_the_plain_network(tmp_path, capsys):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    argv = [*TOY, "--config", str(tmp_path / "c.json")]
    (tmp_path / "c.json").write_text(json.dumps({"log_every": 1}))
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert not counters["stats"]["unique_graphs"]  # nothing compiled without the flag
    assert main([*argv, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the objective called the compiled network
    for name in ("model.safetensors", "ema.safetensors"):
        plain, compiled = (load_file(latest_checkpoint(tmp_path / run) / name) for run in ("plain", "compiled"))
        assert plain.keys() == compiled.keys()  # no "_orig_mod." prefixes
        for key in plain:
            torch.testing.assert_close(compiled[key], plain[key], rtol=1e-4, atol=1e-5)
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-4)
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]
    assert saved["compile"] is True
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["train"]["compile"] is False
