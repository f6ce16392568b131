"""Regional multi-style generation on the zoo: is each region drawn in its own style?

    python benchmarks/regional_accuracy.py --student data/champion --zoo data/zoo \
        --styles pastel,neon --images 24

Renders images twice the zoo's width, the left half asked for the first style
and the right half for the second (``style_regions=``), and classifies each
half with the zoo's style classifier. Prints, per region, the share of images
whose half is classified as its style, next to the share for whole images of
that style alone (the classifier's own ceiling on this student).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=Path("data/champion"))
    parser.add_argument("--zoo", type=Path, default=Path("data/zoo"))
    parser.add_argument("--styles", default="pastel,neon")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from dmm.evaluation.classify import load_classifier, style_probabilities
    from dmm.student.generate import load_student_pipeline

    styles = args.styles.split(",")
    pipe = load_student_pipeline(args.student)
    zoo = json.loads((args.zoo / "zoo.json").read_text())
    clf = load_classifier(args.zoo / zoo["classifier"])
    classes = list(clf.config.heads["style"])
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    hits = {s: 0 for s in styles}
    alone = {s: 0 for s in styles}
    for k in range(args.images):
        prompt = prompts[k % len(prompts)]
        gen = torch.Generator().manual_seed(k)
        regions = [((0, 0, side, side), styles[0]), ((side, 0, 2 * side, side), styles[1])]
        image = pipe(prompt, style_regions=regions, height=side, width=2 * side,
                     num_inference_steps=args.steps, generator=gen, output_type="pt").images[0]  # fmt: skip
        halves = torch.stack([image[:, :, :side], image[:, :, side:]])
        pred = style_probabilities(clf, halves).argmax(-1).tolist()
        for half, style in zip(pred, styles, strict=True):
            hits[style] += int(half == classes.index(style))
        for style in styles:
            gen = torch.Generator().manual_seed(k)
            whole = pipe(prompt, style=style, num_inference_steps=args.steps, generator=gen,
                         output_type="pt").images  # fmt: skip
            alone[style] += int(
                style_probabilities(clf, whole).argmax(-1).item() == classes.index(style)
            )
    for style in styles:
        print(
            f"region {style}: {hits[style] / args.images:.2f} of halves classified {style} "
            f"(whole images of {style}: {alone[style] / args.images:.2f}), {args.images} images"
        )


if __name__ == "__main__":
    main()
