"""`capsx predict`: a trained run's class scores for your own images (capsule lengths for a CapsNet, the
softmax of a CNN's logits), each image prepared as the run's training images were."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from capsx.data.imagefolder import IMAGE_SUFFIXES, files_under
from capsx.data.user_image import prepare_user_image
from capsx.errors import CapsxError
from capsx.jobs.context import Context
from capsx.jobs.ensemble import class_probabilities
from capsx.jobs.trained import TrainedRun

CHUNK = 256  # images per forward pass
MAX_IMAGES = 100_000  # a folder argument larger than this is refused before reading


@dataclass
class Prediction:
    file: str
    scores: list[float]  # one per class, in the run's class order

    def top(self, classes: list[str], k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])[:k]
        return [(classes[i], self.scores[i]) for i in order]


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and every image file under each folder named (sorted), in the order given."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in files_under(p) if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CapsxError(f"{p}: no image files in this folder (expected {', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise CapsxError(f"{p}: no such file or folder")
        if len(out) > MAX_IMAGES:
            raise CapsxError(f"more than {MAX_IMAGES:,} images to predict; give fewer files or folders")
    return out


def predict(t: TrainedRun, files: list[Path]) -> list[Prediction]:
    """Each file's class scores, in chunks of CHUNK images."""
    out: list[Prediction] = []
    model = t.model.eval()
    for start in range(0, len(files), CHUNK):
        part = files[start:start + CHUNK]
        x = torch.cat([prepare_user_image(t.recipe.data, f) for f in part]).to(t.device)
        with torch.no_grad():
            scores = class_probabilities(model(x), t.recipe).cpu()
        out += [Prediction(str(f), s.tolist()) for f, s in zip(part, scores, strict=True)]
    return out


def run_predict(t: TrainedRun, ctx: Context, files: list[Path], *, top: int, as_json: bool,
                csv_path: Path | None) -> list[Prediction]:
    """Predict `files` (as `image_files` lists them) and show the table, or the JSON, and the CSV."""
    from capsx.console import prediction_table

    found = predict(t, files)
    classes, k = t.classes, min(top, len(t.classes))
    kind = "capsule lengths" if t.recipe.model.outputs_capsules else "softmax probabilities"
    if as_json:
        print(json.dumps({"run": t.label, "classes": classes, "scores": kind, "predictions": [
            {"file": p.file, "top": [[c, round(v, 6)] for c, v in p.top(classes, k)],
             "scores": {c: round(v, 6) for c, v in zip(classes, p.scores, strict=True)}} for p in found]}))
    else:
        ctx.say(prediction_table(f"{t.label}: {len(found)} image(s), {kind}", classes, found, k))
    if csv_path is not None:
        try:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            with csv_path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file", *[f"top{i + 1}{s}" for i in range(k) for s in ("", "_score")], *classes])
                for p in found:
                    w.writerow([p.file, *[x for c, v in p.top(classes, k) for x in (c, f"{v:.6f}")],
                                *[f"{v:.6f}" for v in p.scores]])
        except OSError as e:
            raise CapsxError(f"--csv {csv_path}: cannot write it ({e.strerror or e})") from None
        if not as_json:
            ctx.say(f"  wrote {csv_path}", soft_wrap=True)
    return found
