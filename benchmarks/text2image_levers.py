"""Which levers bind objects to places: an A/B screen of the latent text-to-image model.

``text2image.py`` finds the latent model right on the layout (which cells hold an object) but at
chance on the binding (which object is in which cell). This screen trains variants of its latent
U-Net for the same number of steps on one shared VAE and scores each on fresh test prompts, beside
a baseline trained at the same time:

- baseline: the "small" preset without query positions (``context_positions`` 0);
- query positions: Fourier features of the pixel's place added to every cross-attention query
  (3 frequencies), so that "top left" can be matched by where a query sits;
- a deeper text encoder (4 blocks, not 2): the encoder must carry "sneaker" onto "top left";
- cross-attention alone (no self-attention) at 14x14 too (``cross_attention_resolutions``), with
  and without query positions: the prompt reaches the full latent resolution, where each cell is
  7x7 positions, not 3.5x3.5, at about 6% more per step;
- rotary positions in the text encoder (RoPE), with and without query positions: attention scores
  see how far apart two words are, not where each sits, so "sneaker" can take in "top left" next to
  it whatever the paraphrase and wherever the clause falls in the caption. It won the screen and is
  now the presets' text encoder; the levers above keep the learned positions they were screened with.

(Self- and cross-attention at 14x14 as well as 7x7 was screened too, and dropped: it trained at about
a third of the baseline's steps per CPU second, 200 steps to 700, and could not finish in a session.)

The VAE trains first (``--vae-budget`` process CPU seconds on all cores, as the benchmark's latent
side gives it 900); then every variant trains ``--steps`` steps at batch 64 in its own process on one
thread, all at once (so load slows each alike). Each then draws one image per test prompt (``--n``
prompts of the test split, seed ``--seed``, which the benchmark's seed-0 prompts do not share;
dpmpp_2m, ``--nfe`` NFE, guidance ``--guidance``), scored by ``unnoise eval``'s cell classifier:
the whole scene right by object count, the layout, and the binding (the named class where a named
cell holds an object), with the binomial standard error of the whole-scene score.

Run: python benchmarks/text2image_levers.py [--steps 2000] [--n 300] [--out bench-t2i-levers]
     (about 45 min wall on 2 cores at the defaults; a finished VAE or variant in OUT is reused)
Check a choice on fresh prompts: python benchmarks/text2image_levers.py --validate "baseline"
     "text encoder rotary positions" --guidance 3 8 --n 500 --seed 2 (trained levers in OUT, each
     scored at each guidance, with the prompts only the first or only the second gets right)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from text2image import budget, draw  # noqa: E402

# the levers screened before rotary positions became the presets' text encoder keep the learned positions
LEARNED = {"text_encoder": {"positions": "learned"}}
LEVERS: dict[str, dict] = {
    "baseline": {"unet": {"context_positions": 0}} | LEARNED,
    "query positions": {"unet": {"context_positions": 3}} | LEARNED,
    "text encoder depth 4": {"unet": {"context_positions": 0}, "text_encoder": {"depth": 4} | LEARNED["text_encoder"]},
    "cross-attention alone at 14x14": {"unet": {"context_positions": 0, "cross_attention_resolutions": [14]}} | LEARNED,
    "cross-attention alone at 14x14 + query positions": {
        "unet": {"context_positions": 3, "cross_attention_resolutions": [14]}
    }
    | LEARNED,
    "text encoder rotary positions": {"unet": {"context_positions": 0}, "text_encoder": {"positions": "rotary"}},
    "text encoder rotary positions + query positions": {
        "unet": {"context_positions": 3},
        "text_encoder": {"positions": "rotary"},
    },
}
COMMON = {"save_every": 10**7, "log_every": 100, "seed": 0}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def train_vae_once(out: Path, args: argparse.Namespace) -> None:
    from unnoise.modalities.text2image.vae_run import train_vae, vae_settings

    if (out / "vae" / "done").exists():
        return
    settings = vae_settings({"steps": 10**7, **COMMON, "extra": {"scenes": args.scenes}})
    train_vae(settings, out / "vae", overwrite=True, progress=False, stop=budget(args.vae_budget))
    (out / "vae" / "done").write_text("")


def train_lever(name: str, out: Path, args: argparse.Namespace) -> None:
    from unnoise.modalities.run import load_run, make_config, train
    from unnoise.modalities.text2image.data import fashion_scenes

    torch.set_num_threads(1)
    run_dir = out / slug(name)
    extra = {"scenes": args.scenes, "vae": str(out / "vae")} | LEVERS[name]
    start = time.process_time()
    train(
        "text2image",
        make_config("text2image", COMMON | {"steps": args.steps, "extra": extra}),
        run_dir,
        overwrite=True,
        progress=False,
    )
    cpu_s = time.process_time() - start
    run = load_run(run_dir, expect="text2image")
    captions = fashion_scenes(args.n, "test", seed=args.seed).captions
    images = draw(run, captions, args.guidance, args.nfe)
    np.savez(out / f"{slug(name)}.npz", images=images.numpy())
    params = sum(p.numel() for p in run.model.net.parameters())
    (out / f"{slug(name)}.json").write_text(json.dumps({"cpu_s": cpu_s, "params": params}))


def score(out: Path, args: argparse.Namespace) -> None:
    from unnoise.modalities.text2image.data import fashion_scenes, real_scenes
    from unnoise.modalities.text2image.metrics import cell_classifier, predict_cells, prompt_following

    test = fashion_scenes(args.n, "test", seed=args.seed)
    classifier = cell_classifier()
    real = prompt_following(predict_cells(classifier, real_scenes(test.scenes, seed=args.seed)), test.scenes)
    groups = list(real.by_objects)
    print(
        f"\n{args.n} test-split prompts (seed {args.seed}), dpmpp_2m {args.nfe} NFE, guidance {args.guidance:g}; "
        f"{args.steps} U-Net steps each on one VAE ({args.vae_budget:.0f} CPU s), one thread each"
    )
    head = " | ".join(f"{g} obj" for g in groups)
    print(f"| lever | params | CPU s per step | whole scene (± s.e.) | {head} | layout | class where occupied |")
    print("|---|---|---|---|" + "---|" * len(groups) + "---|---|")
    for name in LEVERS:
        r = json.loads((out / f"{slug(name)}.json").read_text())
        images = torch.from_numpy(np.load(out / f"{slug(name)}.npz")["images"])
        pf = prompt_following(predict_cells(classifier, images), test.scenes)
        se = math.sqrt(pf.accuracy * (1 - pf.accuracy) / args.n)
        cells = " | ".join(f"{pf.by_objects[g]:.3f}" for g in groups)
        print(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['cpu_s'] / args.steps:.2f} | {pf.accuracy:.3f} ± {se:.3f} | "
            f"{cells} | {pf.layout:.3f} | {pf.class_where_occupied:.3f} |"
        )
    cells = " | ".join(f"{real.by_objects[g]:.3f}" for g in groups)
    print(f"| real scenes | | | {real.accuracy:.3f} | {cells} | {real.layout:.3f} | {real.class_where_occupied:.3f} |")


def validate(out: Path, args: argparse.Namespace) -> None:
    """Score trained levers on ``--n`` prompts of ``--seed`` at every ``--guidance``, and count the
    prompts that only the first or only the second lever gets right (a paired comparison)."""
    from unnoise.modalities.run import load_run
    from unnoise.modalities.text2image.data import fashion_scenes, scene_labels
    from unnoise.modalities.text2image.metrics import cell_classifier, predict_cells, prompt_following

    torch.set_num_threads(1)
    test = fashion_scenes(args.n, "test", seed=args.seed)
    labels, classifier = scene_labels(test.scenes), cell_classifier()
    runs = {name: load_run(out / slug(name), expect="text2image") for name in args.validate}
    print(f"\n{args.n} test-split prompts (seed {args.seed}), dpmpp_2m {args.nfe} NFE")
    print("| lever | guidance | whole scene | by objects | layout | class where occupied |")
    print("|---|---|---|---|---|---|")
    for guidance in args.guidance:
        right = []
        for name, run in runs.items():
            predicted = predict_cells(classifier, draw(run, test.captions, guidance, args.nfe))
            pf = prompt_following(predicted, test.scenes)
            right.append((predicted == labels).all(dim=1))
            by = ", ".join(f"{g}: {v:.3f}" for g, v in pf.by_objects.items())
            scores = f"{pf.accuracy:.3f} | {by} | {pf.layout:.3f} | {pf.class_where_occupied:.3f}"
            print(f"| {name} | {guidance:g} | {scores} |")
        if len(right) > 1:
            a, b = right[:2]
            print(f"| right only with the first / only with the second | {guidance:g} | "
                  f"{int((a & ~b).sum())} / {int((~a & b).sum())} | | | |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="U-Net training steps per lever")
    parser.add_argument("--vae-budget", type=float, default=900.0, help="process CPU seconds for the shared VAE")
    parser.add_argument("--scenes", type=int, default=20_000, help="training scenes")
    parser.add_argument("--n", type=int, default=300, help="test prompts (one image each) for the scores")
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=[3.0], help="one for the screen; any for --validate"
    )
    parser.add_argument("--seed", type=int, default=1, help="which test-split prompts")
    parser.add_argument("--out", default="bench-t2i-levers")
    parser.add_argument("--validate", nargs="+", choices=list(LEVERS), metavar="LEVER",
                        help="only score these trained levers on --seed's prompts at each --guidance")  # fmt: skip
    parser.add_argument("--one", choices=list(LEVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.validate:
        validate(out, args)
        return
    if len(args.guidance) != 1:
        parser.error("the screen samples at one --guidance (several are for --validate)")
    args.guidance = args.guidance[0]
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        train_lever(args.one, out, args)
        return
    train_vae_once(out, args)
    jobs = []
    for name in LEVERS:
        if not (out / f"{slug(name)}.json").exists():
            log = open(out / f"{slug(name)}.log", "w")
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
            jobs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    for name, job in jobs:
        if job.wait():
            raise SystemExit(f"the lever {name!r} failed: see {out / slug(name)}.log")
    score(out, args)


if __name__ == "__main__":
    main()
