"""A run's best weights as an `mlflow.pyfunc` model: images in, masks (and HC in mm) out."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from segexp import config


def input_cases(model_input, folder: Path) -> list:
    """Cases of `model_input`: image paths or 2D arrays, a list or a frame's `image` column
    (with `pixel_size_mm` for HC); arrays are written to `folder` as PNGs."""
    from segexp.data.cases import Case

    frame = model_input if isinstance(model_input, pd.DataFrame) else None
    images = list(frame["image"]) if frame is not None else list(model_input)
    sizes = list(frame["pixel_size_mm"]) if frame is not None and "pixel_size_mm" in frame else []
    cases = []
    for i, image in enumerate(images):
        if not isinstance(image, str | Path):
            path = folder / f"image_{i}.png"
            Image.fromarray(np.asarray(image).astype(np.uint8)).save(path)
            image = path
        mm = float(sizes[i]) if sizes and pd.notna(sizes[i]) else None
        cases.append(Case(Path(image).stem, Path(image).stem, str(image), pixel_size_mm=mm))
    return cases


class SegModel(mlflow.pyfunc.PythonModel):
    """The network of `config.yaml` with the weights of `weights.pt`, both logged artifacts."""

    def load_context(self, context) -> None:
        from segexp.predict import model_from_checkpoint

        cfg = config.read_stored(Path(context.artifacts["config"]), "the model")
        self.net, self.cfg, self.evaluation = model_from_checkpoint(
            cfg, context.artifacts["weights"], "the model's weights.pt"
        )

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One row per image: `mask` (uint8 0/1, the image's size) and `hc_mm` (NaN: unknown)."""
        from segexp.predict import measure_cases

        with tempfile.TemporaryDirectory() as tmp:
            cases = input_cases(model_input, Path(tmp))
            masks, heads = measure_cases(self.net, self.cfg, self.evaluation, cases)
        hc = [h.hc_mm if h is not None else float("nan") for h in heads]
        return pd.DataFrame({"image": [c.image for c in cases], "mask": masks, "hc_mm": hc})
