"""Audio data sets as float waveforms: WAV folders, synthesised spoken digits, recorded digits, the run split.

Every loader returns an :class:`AudioDataset`: ``waves`` float32 ``(N, samples)`` in [-1, 1] at one
``sample_rate``, ``labels`` long ``(N,)`` (-1 where unlabelled) and ``class_names``. Each clip is read
as mono, resampled, center-cropped or zero-padded to a fixed length and peak-normalised
(:mod:`unnoise.modalities.audio.wav`), so the model sees the waveform itself (DiffWave, Kong et al.
2021, models raw samples in [-1, 1]).

Sources: a folder of WAV files (labels from subfolders or a CSV), spoken digits synthesised with
espeak-ng (and flite, if installed) by :func:`make_spoken_digits` (cached by
:func:`spoken_digits_folder`), and the ten real recordings of "zero".."nine" in Debian's
``asterisk-core-sounds-en-wav``. :func:`split_clips` is the fixed 90/10 train/held-out split.
"""

from __future__ import annotations

import csv as csv_module
import os
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from unnoise.modalities.audio.wav import fit_length, normalise, read_wav, resample
from unnoise.training import distributed

__all__ = [
    "ASTERISK_DIGITS_DIRS",
    "DIGIT_WORDS",
    "ESPEAK_VOICES",
    "FLITE_VOICES",
    "AudioDataset",
    "load_asterisk_digits",
    "load_wav_folder",
    "make_spoken_digits",
    "split_clips",
    "spoken_digits_folder",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng's built-in English voices (no mbrola needed); "+f2"/"+f3" are its female variants.
ESPEAK_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb-x-rp+f2")
# flite's compiled-in voices (awb_time is a limited-domain clock voice, so it is left out).
FLITE_VOICES: tuple[str, ...] = ("kal", "kal16", "awb", "rms", "slt")
_ESPEAK_HINT = "install it with `apt-get install espeak-ng` (and optionally flite)"
# Where Debian's asterisk-core-sounds-en-wav puts digits/0.wav..9.wav; the globs are a fallback.
ASTERISK_DIGITS_DIRS: tuple[str, ...] = (
    "/usr/share/asterisk/sounds/en_US_f_Allison/digits",
    "/usr/share/asterisk/sounds/en/digits",
    "/usr/share/asterisk/sounds/*/digits",
    "/var/lib/asterisk/sounds/en/digits",
)
_ASTERISK_HINT = "install them with `apt-get install asterisk-core-sounds-en-wav`"


@dataclass(frozen=True)
class AudioDataset:
    """Waveforms and labels as tensors.

    Attributes:
        waves: float32 ``(N, samples)`` in [-1, 1], mono, all at ``sample_rate``.
        labels: long ``(N,)``, class ids into ``class_names``, or -1 where unlabelled.
        class_names: one name per class id (empty when unlabelled).
        sample_rate: samples per second.
    """

    waves: Tensor
    labels: Tensor
    class_names: list[str]
    sample_rate: int

    def __post_init__(self) -> None:
        if self.waves.dtype != torch.float32 or self.waves.ndim != 2:
            raise ValueError(f"waves must be float32 (N, samples); got {self.waves.dtype} {tuple(self.waves.shape)}")
        if self.labels.dtype != torch.long or self.labels.shape != self.waves.shape[:1]:
            raise ValueError(
                f"labels must be long ({len(self.waves)},); got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) and not (-1 <= self.labels.min() and self.labels.max() < len(self.class_names)):
            raise ValueError(f"labels must lie in -1..{len(self.class_names) - 1} (the class ids, or -1 unlabelled)")
        if not isinstance(self.sample_rate, int) or self.sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive int (Hz); got {self.sample_rate!r}")

    def __len__(self) -> int:
        return len(self.waves)


def _clip(file: Path, sample_rate: int, samples: int) -> Tensor:
    """One WAV file -> mono float32 ``(samples,)`` at ``sample_rate``, centred and peak-normalised."""
    x, rate = read_wav(file)
    return normalise(fit_length(resample(x, rate, sample_rate), samples)).to(torch.float32)


def _sort_names(names: set[str]) -> list[str]:
    """Class names sorted numerically when they are all integers ("2" before "10"), else as text."""
    if names and all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_csv(file: Path, root: Path) -> list[tuple[Path, str]]:
    """Rows ``file,label`` (an optional header row ``file,label``) -> [(root / file, label)]."""
    with open(file, newline="") as f:
        rows = [row for row in csv_module.reader(f) if row and any(cell.strip() for cell in row)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "label"]:
        rows = rows[1:]
    bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or not row[0].strip()]
    if bad:
        raise ValueError(f"CSV {file}: rows {bad[:10]} are not `file,label` (two columns, a file name first)")
    return [(root / row[0].strip(), row[1].strip()) for row in rows]


def load_wav_folder(
    path: str | Path,
    *,
    sample_rate: int = 8000,
    seconds: float = 1.0,
    labels_from_subfolders: bool = True,
    csv: str | Path | None = None,
    on_error: Literal["skip", "fail"] = "fail",
) -> AudioDataset:
    """Every ``.wav`` under ``path`` (recursively, hidden names skipped) -> waves ``(N, round(seconds * sample_rate))``.

    Each clip is mixed to mono, resampled to ``sample_rate`` (:func:`resample`), center-cropped or
    zero-padded to ``seconds`` (:func:`fit_length`) and peak-normalised (:func:`normalise`).
    Labels: with ``csv`` (rows ``file,label``, file names relative to ``path``) exactly the files it
    lists are loaded; else with ``labels_from_subfolders`` the immediate subfolders are the classes
    (sorted names -> ids 0, 1, ...; files directly in ``path`` get -1); else every label is -1.
    An unreadable file raises ValueError (``on_error="fail"``) or is skipped with a warning (``"skip"``).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} does not exist or is not a folder")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive int (Hz); got {sample_rate!r}")
    samples = round(seconds * sample_rate) if isinstance(seconds, (int, float)) else 0
    if samples < 1:
        raise ValueError(f"seconds must be a positive number giving at least one sample; got {seconds!r}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"unknown on_error {on_error!r}; allowed: 'skip', 'fail'")
    if csv is not None:
        entries = _read_csv(Path(csv), root)
        class_names = _sort_names({label for _, label in entries})
    else:
        files = sorted(
            f
            for f in root.rglob("*")
            if f.suffix.lower() == ".wav"
            and not any(q.startswith(".") for q in f.relative_to(root).parts)
            and f.is_file()
        )
        parts = [f.relative_to(root).parts for f in files]
        class_names = _sort_names({p[0] for p in parts if len(p) > 1}) if labels_from_subfolders else []
        entries = [
            (f, p[0] if len(p) > 1 and labels_from_subfolders else "") for f, p in zip(files, parts, strict=True)
        ]
    if not entries:
        raise ValueError(f"no WAV files (.wav, any case) under {root}" + (f" listed in {csv}" if csv else ""))
    class_id = {name: i for i, name in enumerate(class_names)}

    waves, labels, skipped = [], [], []
    for file, label in entries:
        try:
            if not file.is_file():
                raise ValueError(f"{file} does not exist")
            waves.append(_clip(file, sample_rate, samples))
        except (OSError, ValueError) as err:
            if on_error == "fail":
                raise ValueError(f"cannot load audio {file}: {err} (pass on_error='skip' to skip it)") from err
            skipped.append(str(file.relative_to(root)) if file.is_relative_to(root) else str(file))
            continue
        labels.append(class_id.get(label, -1))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable WAV file(s) under {root}: {', '.join(skipped)}", stacklevel=2)
    if not waves:
        raise ValueError(f"none of the {len(entries)} WAV file(s) under {root} could be read")
    return AudioDataset(torch.stack(waves), torch.tensor(labels, dtype=torch.long), class_names, sample_rate)


def _synthesise(command: list[str], out: Path) -> None:
    """Run a synthesiser that writes ``out``; write to a temporary name first, so no half file remains."""
    tmp = out.with_name(f".{out.name}.tmp")
    command = [str(tmp) if c == "{out}" else c for c in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not tmp.is_file() or tmp.stat().st_size <= 44:
        tmp.unlink(missing_ok=True)
        reason = result.stderr.strip().splitlines()[0] if result.stderr.strip() else f"exit status {result.returncode}"
        raise ValueError(f"`{' '.join(command)}` failed: {reason}")
    os.replace(tmp, out)


def make_spoken_digits(
    out_dir: str | Path,
    *,
    voices: tuple[str, ...] | list[str] = ESPEAK_VOICES,
    speeds: tuple[int, ...] | list[int] = (130, 160, 190),
    pitches: tuple[int, ...] | list[int] = (30, 50, 70),
    flite_voices: tuple[str, ...] | list[str] = FLITE_VOICES,
    workers: int | None = None,
) -> Path:
    """Synthesise "zero".."nine" into ``out_dir/<digit>/*.wav`` for :func:`load_wav_folder`; returns ``out_dir``.

    espeak-ng speaks each word for every ``voice x speed (words/min) x pitch (0..99)``; flite, if
    installed, for every ``flite_voice x speed`` (speed as its duration stretch ``160 / speed``).
    The default grid is 6 x 3 x 3 + 5 x 3 = 69 clips per digit (690 in all, a few seconds of work).
    Files stay at the synthesiser's native rate (16 or 22.05 kHz); the loader resamples them.
    """
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError(f"make_spoken_digits needs the espeak-ng program: {_ESPEAK_HINT}")
    bad = [s for s in speeds if not (isinstance(s, int) and 80 <= s <= 450)]
    bad += [p for p in pitches if not (isinstance(p, int) and 0 <= p <= 99)]
    if bad or not (voices and speeds and pitches):
        raise ValueError(f"need non-empty voices, speeds (ints 80..450 words/min) and pitches (ints 0..99); bad: {bad}")
    out = Path(out_dir)
    jobs: list[tuple[list[str], Path]] = []
    for digit, word in enumerate(DIGIT_WORDS):
        folder = out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for voice in voices:
            for speed in speeds:
                for pitch in pitches:
                    command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", "{out}", word]
                    jobs.append((command, folder / f"espeak-{voice.replace('+', '_')}-s{speed}-p{pitch}.wav"))
        if shutil.which("flite") is not None:
            for voice in flite_voices:
                for speed in speeds:
                    stretch = f"duration_stretch={160 / speed:.3f}"
                    command = ["flite", "-voice", voice, "--setf", stretch, "-t", word, "-o", "{out}"]
                    jobs.append((command, folder / f"flite-{voice}-s{speed}.wav"))
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        for future in [pool.submit(_synthesise, command, file) for command, file in jobs]:
            future.result()  # re-raises the first failure
    return out


def spoken_digits_folder(folder: str | Path | None = None) -> Path:
    """The folder of synthesised spoken digits (:func:`make_spoken_digits`), built on first use.

    ``folder`` defaults to ``~/.cache/unnoise/spoken-digits``; it is built beside, then renamed, so an
    interrupted build never looks complete. In a torchrun group rank 0 builds and the others wait.
    """
    folder = Path(folder) if folder is not None else Path.home() / ".cache" / "unnoise" / "spoken-digits"
    if distributed.current().main and not any(folder.glob("*/*.wav")):
        # Built beside, then renamed: an interrupted build never looks complete.
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        make_spoken_digits(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    distributed.barrier()  # the other processes of a torchrun group wait for rank 0's build
    return folder


def _asterisk_digits_dir() -> Path | None:
    """The first of ASTERISK_DIGITS_DIRS (glob patterns allowed) holding 0.wav..9.wav."""
    for pattern in ASTERISK_DIGITS_DIRS:
        for folder in sorted(Path("/").glob(pattern.lstrip("/"))) if "*" in pattern else [Path(pattern)]:
            if all((folder / f"{d}.wav").is_file() for d in range(10)):
                return folder
    return None


def load_asterisk_digits(sample_rate: int = 8000, seconds: float = 1.0) -> AudioDataset:
    """The ten recordings of "zero".."nine" (Allison Smith, 8 kHz) from Debian's ``asterisk-core-sounds-en-wav``.

    Returns waves ``(10, round(seconds * sample_rate))`` prepared as in :func:`load_wav_folder`,
    labels 0..9, class names "0".."9" (the same ids as :func:`make_spoken_digits` folders).
    """
    folder = _asterisk_digits_dir()
    if folder is None:
        raise FileNotFoundError(f"Asterisk digit recordings not found in {ASTERISK_DIGITS_DIRS[0]}: {_ASTERISK_HINT}")
    samples = round(seconds * sample_rate)
    if not isinstance(sample_rate, int) or sample_rate < 1 or samples < 1:
        raise ValueError(
            f"need a positive int sample_rate and seconds giving >= 1 sample; got {sample_rate!r}, {seconds!r}"
        )
    waves = torch.stack([_clip(folder / f"{d}.wav", sample_rate, samples) for d in range(10)])
    return AudioDataset(waves, torch.arange(10), [str(d) for d in range(10)], sample_rate)


def split_clips(data: AudioDataset, split: str = "train") -> AudioDataset:
    """A run's split of ``data``: a fixed permutation (seed 1234), the first 90% for ``"train"``, the
    other 10% for any other split (held-out clips)."""
    order = torch.randperm(len(data.waves), generator=torch.Generator().manual_seed(1234))
    cut = int(0.9 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    return AudioDataset(data.waves[idx], data.labels[idx], data.class_names, data.sample_rate)
