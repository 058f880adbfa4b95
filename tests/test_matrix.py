"""Every training setting works for every modality, or is refused in one line (through the CLI).

The matrix: modality x --objective x --loss x --prediction x --bf16, 3 training steps each. A
valid cell trains (finite loss in the log, a checkpoint, the settings recorded in config.json as
applied) and samples; a refused cell exits 2 with one line on stderr and writes nothing.
"""

import json
import math
import wave

import numpy as np
import pytest
import torch

from unnoise.cli import main

MODALITIES = ("image", "text", "audio", "toy")
LOSSES = (None, "simple", "hybrid", "vlb", "min_snr")
PREDICTIONS = (None, "eps", "x0", "v")


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """A folder of WAVs in two classes (low and high tones), 0.5 s at 8 kHz: audio data in a blink."""
    root = tmp_path_factory.mktemp("tones")
    t = np.arange(4000) / 8000
    for label, base in (("low", 220.0), ("high", 880.0)):
        (root / label).mkdir()
        for i in range(4):
            x = 0.5 * np.sin(2 * np.pi * base * (1 + 0.05 * i) * t)
            with wave.open(str(root / label / f"{i}.wav"), "wb") as f:
                f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000)
                f.writeframes((x * 32767).astype("<i2").tobytes())
    return root


def _flags(modality: str, tones) -> list[str]:
    data = {"image": "digits", "text": "tiny", "audio": str(tones), "toy": "ring"}[modality]
    flags = [modality, "--data", data, "--model", "tiny", "--steps", "3", "--batch-size", "4", "--save-every", "3"]
    if modality == "audio":  # quarter-second clips: a quarter of the U-Net's work
        (tones / "settings.json").write_text(json.dumps({"extra": {"seconds": 0.25}}))
        flags += ["--config", str(tones / "settings.json")]
    return flags


def _refusal(modality: str, objective: str, loss: str | None, prediction: str | None) -> str | None:
    """What the cell must be refused for (a substring of the one line), or None if it must train."""
    if objective == "edm" and (loss or prediction):
        return "apply to objective 'ddpm', not 'edm'"
    if modality == "text" and loss in ("hybrid", "vlb"):
        return "text runs do not learn the reverse variance"
    return None


CELLS = [
    (m, o, loss, p, b)
    for m in MODALITIES
    for o in ("ddpm", "edm")
    for loss in (LOSSES if o == "ddpm" else (None, "hybrid"))
    for p in (PREDICTIONS if o == "ddpm" else (None, "v"))
    for b in (False, True)
    if o == "edm" or (loss is not None and p is not None) or (loss is None and p is None)
]


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_every_setting_trains_and_samples_or_is_refused(modality, tones, tmp_path, capsys):
    outcomes = []
    for i, (m, objective, loss, prediction, bf16) in enumerate(c for c in CELLS if c[0] == modality):
        out = tmp_path / f"run{i}"
        argv = ["train", *_flags(m, tones), "--objective", objective, "--out", str(out)]
        argv += ["--loss", loss] * bool(loss) + ["--prediction", prediction] * bool(prediction) + ["--bf16"] * bf16
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        cell = f"{m} {objective} loss={loss} prediction={prediction} bf16={bf16}"
        refusal = _refusal(m, objective, loss, prediction)
        if refusal is not None:
            assert code == 2 and len(err) == 1 and refusal in err[0], (cell, err)
            assert not out.exists(), cell  # refused before any work
            outcomes.append("refused")
            continue
        assert code == 0, (cell, err)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert log and all(math.isfinite(r["loss"]) for r in log), cell
        assert (out / "checkpoints" / "step_00000003" / "ema.safetensors").is_file(), cell
        saved = json.loads((out / "config.json").read_text())["train"]
        assert saved["objective"] == objective and saved["bf16"] == bf16, cell
        if objective == "ddpm":  # what was asked is what was applied and recorded
            assert saved["loss"] == (loss or "simple") and saved["sigma_data"] is None, cell
            assert prediction is None or saved["prediction"] == prediction, cell
        else:  # EDM records its own settings, none of DDPM's
            assert saved["loss"] is saved["prediction"] is saved["schedule"] is None, cell
            assert saved["sigma_data"] > 0 and saved["sigma_max"] == 80.0, cell
        sample = ["sample", "--run", str(out), "--n", "2", "--nfe", "2", "--out", str(tmp_path / f"s{i}")]
        assert main(sample) == 0, cell
        assert list(tmp_path.glob(f"s{i}*")), cell
        outcomes.append("trained")
    assert "trained" in outcomes and "refused" in outcomes


@pytest.mark.parametrize("modality", MODALITIES)
def test_bf16_reaches_the_network_of_every_modality(modality, tones, tmp_path, monkeypatch):
    """--bf16 is not only recorded: every modality's network runs under bf16 autocast in training."""
    from unnoise.modalities.base import get_modality

    seen = []
    impl = get_modality(modality)

    def spy(net):
        def run(x, t, cond):
            seen.append(torch.is_autocast_enabled("cpu"))
            return net(x, t, cond)

        return run

    # the network of the training step (the previews' sampling uses bf16 only where it is native)
    monkeypatch.setattr(impl, "encode", lambda model, x, enc=impl.encode: (e := enc(model, x))._replace(net=spy(e.net)))
    assert main(["train", *_flags(modality, tones), "--bf16", "--out", str(tmp_path / "run")]) == 0
    assert seen and all(seen), seen


def test_a_modality_setting_it_cannot_honour_is_refused_up_front(tmp_path, capsys):
    argv = ["train", "audio", "--arch", "diffwave", "--loss", "hybrid", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--arch diffwave has one" in err[0]
    assert not (tmp_path / "run").exists()
