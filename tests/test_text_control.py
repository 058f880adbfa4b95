"""Attribute control for text runs: the noisy-embedding classifier, the guidance combinator, control success."""

import csv
import json

import pytest
import torch

from unnoise.guidance import classifier_guidance
from unnoise.modalities.text.attribute_classifier import (
    AttributeClassifier,
    ClassifierConfig,
    field_values,
    load_classifier,
    save_classifier,
    train_classifier,
)
from unnoise.modalities.text.control import control_log_prob, controlled
from unnoise.modalities.text.control_metrics import Judge, control_success, mentions
from unnoise.modalities.text.diffusion_lm import WordEmbedding
from unnoise.schedules import DiscreteSchedule

FIELDS = {"food": ["Chinese", "Italian"], "area": ["riverside"]}


def small_classifier(seq_len=6, embed_dim=4, fields=FIELDS, seed=0):
    torch.manual_seed(seed)
    return AttributeClassifier(ClassifierConfig(embed_dim, seq_len, fields, width=16, depth=1, heads=2))


# ---- the classifier ----------------------------------------------------------------------------------


def _marker_data(n=256, L=6, seed=0):
    """Filler tokens 3..7; token 1 somewhere -> food Chinese, token 2 -> Italian, neither -> absent."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 8, (n, L), generator=g)
    cls = torch.randint(0, 3, (n,), generator=g)  # 0 absent, 1 Chinese, 2 Italian
    pos = torch.randint(0, L, (n,), generator=g)
    ids[cls > 0, pos[cls > 0]] = cls[cls > 0]
    area = (ids[:, 0] == 3).long()  # area riverside iff the first token is 3
    return ids, torch.stack([cls, area], 1)


def test_classifier_learns_a_separable_toy_problem_deterministically():
    torch.manual_seed(0)
    emb = WordEmbedding(8, 4)
    ids, labels = _marker_data()
    schedule = DiscreteSchedule(torch.full((10,), 1e-3))  # sigma <= 0.1: the markers stay separable
    kw = dict(steps=150, batch_size=64, lr=3e-3, seed=1)
    clf = small_classifier()
    losses = train_classifier(clf, emb, ids, labels, schedule, **kw)
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10
    test_ids, test_labels = _marker_data(seed=1)
    with torch.no_grad():
        logits = clf.eval()(emb.embed(test_ids) + 0.05 * torch.randn(256, 6, 4), torch.tensor(0.05))
    assert (logits["food"].argmax(-1) == test_labels[:, 0]).float().mean() > 0.95
    assert (logits["area"].argmax(-1) == test_labels[:, 1]).float().mean() > 0.95
    again = small_classifier()
    assert train_classifier(again, emb, ids, labels, schedule, **kw) == losses  # same seeds, same run
    for p, q in zip(clf.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_labels_and_field_values_from_mrs():
    mrs = [{"food": "Italian", "name": "X"}, {"area": "riverside"}, {"food": "Chinese", "area": "riverside"}]
    assert field_values(mrs, ["food", "area", "eatType"]) == {"food": ["Chinese", "Italian"], "area": ["riverside"]}
    assert small_classifier().labels(mrs).tolist() == [[2, 0], [0, 1], [1, 1]]


def test_log_prob_is_a_normalised_sum_over_fields():
    """p(food=Chinese, area) + p(food=Italian, area) + p(food=absent) p(area) = p(area): fields independent given x."""
    clf = small_classifier()
    x, sigma = torch.randn(3, 6, 4), torch.tensor([0.5, 1.0, 5.0])
    joint = [clf.log_prob(x, sigma, clf.targets({"food": f, "area": "riverside"})) for f in ("Chinese", "Italian")]
    logits = clf(x, sigma)
    absent, area = torch.log_softmax(logits["food"], -1)[:, 0], torch.log_softmax(logits["area"], -1)[:, 1]
    assert torch.allclose(torch.logsumexp(torch.stack([*joint, absent + area]), 0), area, atol=1e-5)


# ---- guidance ------------------------------------------------------------------------------------


def _linear_log_prob(W, c):
    """log softmax(W x_flat)[c]: grad = W[c] - sum_k p_k W[k] in closed form."""
    return lambda x, sigma: torch.log_softmax(x.flatten(1) @ W.T, -1)[:, c]


def test_one_step_is_classifier_guidance_with_the_closed_form_gradient():
    torch.manual_seed(0)
    W, x, sigma = torch.randn(3, 8), torch.randn(5, 2, 4), torch.tensor([0.3, 0.7, 1.0, 2.0, 4.0])
    D = lambda x, sigma: 0.5 * x  # noqa: E731
    lp = _linear_log_prob(W, 1)
    p = torch.softmax(x.flatten(1) @ W.T, -1)
    grad = (W[1] - p @ W).reshape(5, 2, 4)
    out = controlled(D, lp, scale=2.0)(x, sigma)
    assert torch.allclose(out, 0.5 * x + 2.0 * sigma[:, None, None] ** 2 * grad, atol=1e-5)
    assert torch.allclose(out, classifier_guidance(D, lp, 2.0)(x, sigma), atol=1e-6)
    delta = out - D(x, sigma)
    assert (lp(x + 1e-3 * delta, sigma) > lp(x, sigma)).all()  # the shift raises log p(control)


def test_proximal_steps_reach_the_closed_form_optimum():
    """log p = -||x - m||^2 / 2: J(delta) = s log p(x + delta) - lam ||delta||^2 / (2 sigma^2) is maximised
    at delta* = s sigma^2 (m - x) / (lam + s sigma^2)."""
    m, x, sigma = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([0.5, 1.0])
    lp = lambda x, sigma: -0.5 * ((x - m) ** 2).flatten(1).sum(1)  # noqa: E731
    s, lam = 0.5, 1.0
    out = controlled(lambda x, sigma: torch.zeros_like(x), lp, scale=s, fluency=lam, steps=60)(x, sigma)
    s2 = sigma[:, None, None] ** 2
    assert torch.allclose(out, s * s2 * (m - x) / (lam + s * s2), atol=1e-5)


def test_infinite_fluency_leaves_the_denoiser_unchanged():
    torch.manual_seed(0)
    clf = small_classifier()
    D = lambda x, sigma: torch.tanh(x)  # noqa: E731
    x, sigma = torch.randn(4, 6, 4), torch.tensor(3.0)
    lp = control_log_prob(clf, {"food": "Chinese"})
    assert torch.allclose(controlled(D, lp, scale=5.0, fluency=1e30, steps=3)(x, sigma), D(x, sigma))
    assert not torch.allclose(controlled(D, lp, scale=5.0, fluency=1.0, steps=3)(x, sigma), D(x, sigma))
    with torch.no_grad():  # samplers run under no_grad: the combinator still gets its gradient
        guided = controlled(D, lp, scale=5.0)(x, sigma)
    assert not torch.allclose(guided, D(x, sigma))


@pytest.mark.parametrize("kw, match", [({"scale": -1.0}, "scale"), ({"fluency": float("nan")}, "fluency"),
                                       ({"steps": 0}, "steps")])  # fmt: skip
def test_bad_guidance_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        controlled(lambda x, s: x, lambda x, s: x.sum((1, 2)), **kw)


def test_bad_field_or_value_is_a_one_line_error():
    clf = small_classifier()
    for control, match in [
        ({"colour": "red"}, "unknown control field 'colour'; allowed: food, area"),
        ({"food": "Martian"}, "unknown value 'Martian' for food; allowed: Chinese, Italian"),
        ({}, "control is empty"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            control_log_prob(clf, control)
        assert "\n" not in str(err.value)


# ---- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    clf = small_classifier()
    folder = save_classifier(clf, tmp_path, {"note": "first"})
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "weights.safetensors"]
    loaded = load_classifier(tmp_path)
    x, sigma = torch.randn(2, 5, 4), torch.tensor([0.1, 10.0])
    with torch.no_grad():
        a, b = clf.eval()(x, sigma), loaded(x, sigma)
    assert all(torch.equal(a[f], b[f]) for f in FIELDS) and loaded.config == clf.config
    assert loaded.metrics == {"note": "first"}
    save_classifier(small_classifier(seed=1), tmp_path, {"note": "second"})  # replaces the folder atomically
    assert load_classifier(tmp_path).metrics == {"note": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control"]  # no temp folders left behind
    with pytest.raises(FileNotFoundError, match="train_control"):
        load_classifier(tmp_path / "elsewhere")


# ---- control success --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence, field, value, expected",
    [
        ("The Golden Palace serves CHINESE food.", "food", "Chinese", True),
        ("The Golden Palace serves Italian food.", "food", "Chinese", False),
        ("Fast food at the Eagle.", "food", "Fast food", True),
        ("The food is fast.", "food", "Fast food", False),
        ("A family-friendly pub.", "familyFriendly", "yes", True),
        ("It is kid friendly.", "familyFriendly", "yes", True),
        ("Children are welcome.", "familyFriendly", "yes", True),
        ("It is not family-friendly.", "familyFriendly", "yes", False),
        ("It is not family-friendly.", "familyFriendly", "no", True),
        ("It isn't kid friendly.", "familyFriendly", "no", True),
        ("A pub by the river.", "familyFriendly", "no", False),
        ("It has a high customer rating.", "customer rating", "high", True),
        ("It is in the high price range.", "customer rating", "high", False),
        ("It is in the high price range.", "priceRange", "high", True),
        ("It is rated 5 out of 5.", "customer rating", "5 out of 5", True),
        ("Prices are £20-25.", "priceRange", "£20-25", True),
        ("It costs less than £20.", "priceRange", "less than £20", True),
        ("Located in the City Centre.", "area", "city centre", True),
    ],
)
def test_mentions(sentence, field, value, expected):
    assert mentions(sentence, field, value) is expected


class FixedJudge(Judge):
    """A judge whose verdicts are given, to test the AND of mention and verdict."""

    def __init__(self, verdicts):
        super().__init__(None, {})
        self.verdicts = verdicts

    def _check(self, field, value=None):
        pass

    def predict(self, sentences, field):
        return self.verdicts


def test_control_success_needs_mention_and_judge():
    sentences = ["a chinese pub .", "a chinese pub .", "an italian pub .", "an italian pub ."]
    judge = FixedJudge(["Chinese", "Italian", "Chinese", "absent"])
    assert control_success(sentences, "food", "Chinese", judge) == 0.25  # only the first passes both


MINI = [
    ("the wok serves chinese food .", {"food": "Chinese"}),
    ("chinese food is served at the wok .", {"food": "Chinese"}),
    ("try the chinese dishes by the river .", {"food": "Chinese", "area": "riverside"}),
    ("the pasta place serves italian food .", {"food": "Italian"}),
    ("italian food is served at the pasta place .", {"food": "Italian"}),
    ("try the italian dishes by the river .", {"food": "Italian", "area": "riverside"}),
    ("a pub by the river .", {"area": "riverside"}),
    ("a quiet pub .", {}),
]


def test_judge_on_hand_written_sentences():
    text, mrs = [s for s, _ in MINI], [m for _, m in MINI]
    judge = Judge.fit(text, mrs, ["food", "area", "eatType"], held_out=(text, mrs))
    assert judge.fields == ["food", "area"]  # eatType never varies: nothing to judge
    assert judge.classes("food") == ["Chinese", "Italian", "absent"]
    assert judge.accuracy["food"] == 1.0 and 0 <= judge.accuracy["area"] <= 1
    new = ["the wok serves chinese food .", "the pasta place serves italian food .", "a quiet pub ."]
    assert control_success(new, "food", "Chinese", judge) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown field 'colour'; allowed: food, area"):
        control_success(new, "colour", "red", judge)
    with pytest.raises(ValueError, match="unknown value 'Thai' for food; allowed: Chinese, Italian"):
        control_success(new, "food", "Thai", judge)


# ---- end to end on a few dozen E2E pairs ---------------------------------------------------------------


@pytest.fixture
def small_e2e(tmp_path, monkeypatch):
    """Every 150th pair of each E2E split (about 30 each), through the project's loader (UNNOISE_E2E)."""
    from unnoise.modalities.text.data import E2E_FILES, _e2e_folder

    try:
        source = _e2e_folder(None)
    except FileNotFoundError:
        pytest.skip("E2E data not available")
    folder = tmp_path / "e2e"
    folder.mkdir()
    for name in E2E_FILES.values():
        with open(source / name, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        rows = rows[:1] + rows[1::150]
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
    monkeypatch.setenv("UNNOISE_E2E", str(folder))
    return folder


def test_end_to_end_on_e2e(tmp_path, small_e2e):
    from unnoise.modalities.run import make_config, train
    from unnoise.modalities.text.attribute_classifier import train_control
    from unnoise.modalities.text.control import sample_controlled
    from unnoise.modalities.text.control_metrics import train_judge
    from unnoise.modalities.text.pipeline import load_text_run, sample_text

    settings = dict(data="e2e", model="tiny", T=50, steps=3, batch_size=8, conditional=False, log_every=1)
    cfg = make_config("text", settings | {"extra": {"embed_dim": 8, "seq_len": 24}})
    train("text", cfg, tmp_path / "run", progress=False)
    clf = train_control(tmp_path / "run", steps=5, width=16, depth=1)
    meta = json.loads((tmp_path / "run" / "control" / "meta.json").read_text())
    assert set(meta["metrics"]["held_out_accuracy_sigma_min"]) == set(clf.fields)
    run = load_text_run(tmp_path / "run")
    food = clf.config.fields["food"][0]
    guided = sample_controlled(run, {"food": food}, n=3, sampler="ddpm", nfe=4, scale=5.0)
    assert len(guided) == 3 and all(isinstance(s, str) for s in guided)
    # scale 0 is the run's own unconditional sampler, sample for sample
    plain = sample_controlled(run, {"food": food}, n=3, sampler="euler", nfe=4, scale=0.0, seed=7)
    assert plain == sample_text(run, n=3, sampler="euler", nfe=4, seed=7)
    with pytest.raises(ValueError, match="unknown value 'Martian' for food; allowed: "):
        sample_controlled(run, {"food": "Martian"}, n=1, nfe=2)
    assert 0 <= control_success(guided, "food", food, train_judge(run)) <= 1
    with pytest.raises(ValueError, match="train it for this run"):
        sample_controlled(run, {"food": "Chinese"}, n=1, nfe=2, classifier=small_classifier())
    with pytest.raises(ValueError, match="needs a run conditioned on E2E meaning representations"):
        sample_controlled(run, {"food": food}, n=1, nfe=2, guidance=2.0)


def test_control_with_guidance_on_the_partial_mr(tmp_path, small_e2e):
    """On an MR-conditional run, guidance=g samples from the model given the control as a partial MR
    (classifier-free guided), and the classifier steers that."""
    from unnoise.modalities.run import make_config, train
    from unnoise.modalities.text.attribute_classifier import train_control
    from unnoise.modalities.text.control import sample_controlled
    from unnoise.modalities.text.pipeline import load_text_run, sample_text

    cfg = make_config("text", dict(data="e2e", model="tiny", T=50, steps=3, batch_size=8, log_every=1,
                      extra={"embed_dim": 8, "seq_len": 24}))  # fmt: skip
    train("text", cfg, tmp_path / "run", progress=False)
    clf = train_control(tmp_path / "run", steps=5, width=16, depth=1)
    run = load_text_run(tmp_path / "run")
    food = clf.config.fields["food"][0]
    plain = sample_controlled(run, {"food": food}, n=3, sampler="euler", nfe=4, scale=0.0, guidance=2.0, seed=3)
    assert plain == sample_text(run, n=3, sampler="euler", nfe=4, mr=f"food[{food}]", guidance=2.0, seed=3)
    steered = sample_controlled(run, {"food": food}, n=3, sampler="euler", nfe=4, scale=50.0, guidance=2.0, seed=3)
    assert len(steered) == 3 and all(isinstance(s, str) for s in steered)


def test_control_needs_an_e2e_run(tmp_path):
    from unnoise.modalities.run import make_config, train
    from unnoise.modalities.text.attribute_classifier import train_control

    cfg = make_config(
        "text", dict(data="tiny", model="tiny", T=20, steps=1, batch_size=4, log_every=1, extra={"embed_dim": 4})
    )
    train("text", cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="attribute control needs MRs"):
        train_control(tmp_path / "run", steps=1)
