"""Text end to end on a tiny Diffusion-LM: train, sample, infill, and one-line errors."""

import json

import pytest
from conftest import one_line_exit_2

from unnoise.cli.main import main
from unnoise.modalities.text.metrics import fluency
from unnoise.modalities.text.pipeline import load_text_run, parse_template, sample_text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    settings = root / "settings.json"
    settings.write_text(json.dumps({"T": 100, "log_every": 5, "extra": {"embed_dim": 8}}))
    args = ["train", "text", "--data", "tiny", "--model", "tiny", "--steps", "10", "--batch-size", "16"]
    assert main([*args, "--config", str(settings), "--out", str(root / "run")]) == 0
    return root / "run"


def test_sampling_writes_sentences(run, tmp_path, capsys):
    assert main(["sample", "text", "--run", str(run), "--n", "4", "--nfe", "5", "--out", str(tmp_path / "s")]) == 0
    lines = (tmp_path / "s.txt").read_text().splitlines()
    assert len(lines) == 4


def test_template_words_are_kept(run):
    text_run = load_text_run(run)
    for s in sample_text(text_run, n=3, nfe=5, template="the ___ is near the ___ ."):
        words = s.split()
        assert words[0] == "the" and words[2:5] == ["is", "near", "the"] and words[6] == "."


def test_template_parsing(run):
    text_run = load_text_run(run)
    ids, known = parse_template(text_run, "the ___ is")
    assert known.tolist()[:4] == [True, False, True, True]  # the, blank, is, <end>
    assert ids[3].item() == text_run.tokenizer.end_id
    with pytest.raises(ValueError, match="not in the model's vocabulary: zebra"):
        parse_template(text_run, "the zebra ___")
    with pytest.raises(ValueError, match="this model takes at most"):
        parse_template(text_run, " ".join(["the"] * 100))


def test_fluency_scores(run):
    text_run = load_text_run(run)
    scores = fluency(text_run, ["the cafe is near the river .", "the pub is open late ."])
    assert scores["ppl_generated"] > 1 and 0 < scores["distinct2_generated"] <= 1


def _one_line_exit_2(argv, capsys, match):
    one_line_exit_2(main, argv, capsys, match)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--template", "the zebra ___"], "zebra"),
        (["--class", "3"], "text runs take --template"),
        (["--mr", "food[Chinese]"], "unconditional"),
        (["--guidance", "2"], "guidance needs a meaning representation"),
        (["--template", " ".join(["the"] * 80)], "at most"),
    ],
)
def test_bad_text_sampling_input(run, tmp_path, capsys, extra, match):
    _one_line_exit_2(["sample", "--run", str(run), "--nfe", "2", "--out", str(tmp_path / "s"), *extra], capsys, match)


def test_modality_mismatch(run, tmp_path, capsys):
    _one_line_exit_2(["sample", "image", "--run", str(run), "--out", str(tmp_path / "s")], capsys, "is a text run")


def test_bad_text_data(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["train", "text", "--data", str(empty), "--steps", "1", "--out", str(tmp_path / "r")]
    _one_line_exit_2(argv, capsys, "empty.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa caf\xe9\n")
    _one_line_exit_2([*argv[:3], str(bad), *argv[4:]], capsys, "bad.txt")
    _one_line_exit_2(["train", "text", "--data", "klingon", "--out", str(tmp_path / "r")], capsys, "allowed: tiny, e2e")


def test_data_to_text_on_e2e_with_guidance(tmp_path, capsys):
    """A tiny conditional model on E2E: MR conditions, classifier-free guided sampling, MR errors."""
    pytest.importorskip("unnoise.modalities.text.data")
    from unnoise.modalities.text.data import load_e2e

    try:
        load_e2e()
    except FileNotFoundError:
        pytest.skip("E2E data not available")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"T": 50, "extra": {"embed_dim": 8, "seq_len": 24}}))
    args = ["train", "text", "--data", "e2e", "--model", "tiny", "--steps", "3", "--batch-size", "8"]
    assert main([*args, "--config", str(settings), "--out", str(tmp_path / "run")]) == 0
    sample = ["sample", "text", "--run", str(tmp_path / "run"), "--n", "3", "--nfe", "3"]
    mr = "name[Aromi], eatType[coffee shop], food[Chinese], area[city centre]"
    assert main([*sample, "--mr", mr, "--guidance", "2", "--out", str(tmp_path / "s")]) == 0
    assert len((tmp_path / "s.txt").read_text().splitlines()) == 3
    capsys.readouterr()
    _one_line_exit_2([*sample, "--mr", "food[Martian]", "--out", str(tmp_path / "bad")], capsys, "food=Martian")
    _one_line_exit_2([*sample, "--mr", "colour[red]", "--out", str(tmp_path / "bad")], capsys, "colour")
    # Control by the attribute classifier: train it, steer toward a food, and the CLI's errors.
    assert main(["train", "control", "--out", str(tmp_path / "run"), "--steps", "3"]) == 0
    assert (tmp_path / "run" / "control" / "weights.safetensors").is_file()
    capsys.readouterr()
    steer = [*sample, "--sampler", "ddpm", "--nfe", "4", "--out", str(tmp_path / "c")]
    assert main([*steer, "--control", "food=Chinese", "--control-scale", "5"]) == 0
    assert len((tmp_path / "c.txt").read_text().splitlines()) == 3
    capsys.readouterr()
    steer[-1] = str(tmp_path / "bad")  # c.txt exists now: a refusal must not be about that
    _one_line_exit_2([*steer, "--control", "food"], capsys, "--control takes FIELD=VALUE")
    _one_line_exit_2([*steer, "--control", "colour=red"], capsys, "colour")
    _one_line_exit_2([*steer, "--control", "food=Martian"], capsys, "Martian")
    _one_line_exit_2([*steer, "--control", "food=Chinese", "--mr", mr], capsys, "does not combine with --template")
    # unnoise eval on a conditional text run: fluency figures and data-to-text BLEU.
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--n", "4", "--nfe", "3", "--sampler", "euler"]) == 0
    out = capsys.readouterr().out
    assert "Kneser-Ney trigram perplexity" in out and "distinct-2" in out and "data-to-text BLEU on" in out
    assert main(["eval", "--run", str(tmp_path / "run"), "--bpd", "--n", "6"]) == 0
    out = capsys.readouterr().out
    assert "bits/token" in out and "given each sentence's meaning representation" in out
    refused = "text runs take --bpd, --n, --guidance (eval); not --fid"
    _one_line_exit_2(["eval", "--run", str(tmp_path / "run"), "--fid", "10"], capsys, refused)
