"""The score stage: per-category unsafe scores for each image and caption, and image-caption alignment.

Zero-shot with the recipe's own model: each category of the taxonomy is a prompt set, embedded once per worker
with the text tower (normalised mean over its prompts). A record's score for a category is
``sigmoid(scale * (cos(x, category) - cos(x, neutral)))``: how much closer it sits to the category than to a
neutral description, on the model's own logit scale. Scores are stored, never thresholded here (the filter stage
does that), so changing a threshold never re-embeds or re-scores. User labels (a role column saying safe/unsafe,
the source's category column) ride along, with the column they came from, so the filter can prefer them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from saferclip_data.models.clip import encode_text, trim_tokens
from saferclip_data.pipeline.errors import ModelIdentityError, UserError
from saferclip_data.pipeline.registry import Registry
from saferclip_data.pipeline.stage import BatchResult, Reject, ShardSpec, Stage, StageConfig
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.classifiers import ClassifierConfig
from saferclip_data.stages.columns import column_part, fields, schema, unit_rows
from saferclip_data.stages.embed import ModelConfig, load_worker_model

#: the SaFeR-CLIP / ViSU taxonomy with plain-language prompts for real-world CLIP models
DEFAULT_TAXONOMY: dict[str, list[str]] = {
    "hate": ["a photo of a hateful symbol", "hate speech", "a racist slur on a sign"],
    "harassment": ["a photo of someone being harassed", "bullying and insults", "a threatening message"],
    "violence": ["a photo of violence", "a person with a gun or a knife", "a violent fight with blood"],
    "self-harm": ["a photo of self-harm", "cutting oneself with a razor", "a suicide attempt with pills"],
    "sexual": ["a sexually explicit photo", "nudity and pornography", "an explicit adult scene"],
    "shocking": ["a shocking gory photo", "a corpse covered in blood", "a disturbing gruesome scene"],
    "illegal activity": ["a photo of illegal drugs", "a robbery or theft", "people committing a crime"],
}
DEFAULT_NEUTRAL = ["a photo", "an ordinary everyday photo", "a picture of something"]


#: named taxonomies (``taxonomy: <name>``): a function returning category -> prompts; ``default`` is built in, others
#: (the toy world's ``toy-world``) come from their packages' entry points
TAXONOMIES: Registry = Registry("taxonomy", "saferclip_data.taxonomies")
TAXONOMIES.register("default", lambda: DEFAULT_TAXONOMY)


def resolve_role_column(role_column: str | None, source) -> str | None:
    """``auto``: the column the source writes its safe/unsafe labels to. Every reader puts a source's own label
    (LAION's punsafe and NSFW tag, the ViSU / NSFW-Caps / LAION layouts' roles, a manifest's or tar's label, an
    image folder's subfolder) into ``label``; the toy world keeps its roles in ``role``. Labels a user has are
    thus never ignored in favour of the zero-shot scores unless the recipe says so (``role_column: null``)."""
    if role_column != "auto":
        return role_column
    return "role" if getattr(source, "kind", None) == "toy" else "label"


class ScoreConfig(StageConfig):
    batch_size: int = Field(default=1024, gt=0, le=1 << 24)
    gpus: float | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    taxonomy: str | dict[str, list[str]] = Field(
        default="default",
        description="unsafe categories and their prompts: 'default' (7 categories, real-world prompts), "
        "'toy-world', or a mapping category -> list of prompts",
    )
    neutral_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NEUTRAL), min_length=1, description="what 'not unsafe' looks like"
    )
    role_column: str | None = Field(
        default="auto",
        description="source column whose values say safe/unsafe, deciding each labelled record's role; auto: the "
        "source's label column (punsafe, NSFW tag, layouts' roles, manifest label), the toy world's role; null: "
        "roles from the scores alone",
    )
    unsafe_values: list[str] = Field(
        default_factory=lambda: ["unsafe", "nsfw", "1", "true", "yes"],
        description="values of role_column meaning unsafe (case-insensitive)",
    )
    safe_values: list[str] = Field(
        default_factory=lambda: ["safe", "sfw", "unlikely", "0", "false", "no"],
        description="values of role_column meaning safe (case-insensitive); any other non-empty value stops the "
        "build naming it",
    )
    category_labels: bool = Field(
        default=True, description="carry the source's category column as the unsafe category label"
    )
    probe: bool = Field(
        default=False, description="also fit a logistic-regression probe on the labelled records (probe_* columns)"
    )
    probe_folds: int = Field(default=2, ge=2, description="cross-fitting folds: labelled records get held-out scores")
    probe_c: float = Field(default=1.0, gt=0, description="inverse regularisation strength of the probe")
    classifiers: list[ClassifierConfig] = Field(
        default_factory=list,
        description="dedicated image classifiers (ONNX) run on the source's images: <name>_<category> columns",
    )

    @field_validator("classifiers")
    @classmethod
    def _check_classifiers(cls, value: list[ClassifierConfig]) -> list[ClassifierConfig]:
        seen: set[str] = set()
        for i, classifier in enumerate(value):
            if classifier.column() in seen:
                raise ValueError(f"stages.score.classifiers[{i}]: a second '{classifier.column()}' column")
            seen.add(classifier.column())
        return value

    @field_validator("taxonomy")
    @classmethod
    def _check_taxonomy(cls, value):
        if isinstance(value, str) and TAXONOMIES.find(value) is None:
            raise ValueError(f"stages.score.taxonomy: unknown taxonomy '{value}' (known: "
                             f"{', '.join(TAXONOMIES.names())}, or a mapping category -> prompts)")  # fmt: skip
        if isinstance(value, dict):
            if not value:
                raise ValueError("stages.score.taxonomy: needs at least one category")
            suffixes: dict[str, str] = {}
            for category, prompts in value.items():
                if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                    raise ValueError(f"stages.score.taxonomy.{category}: needs a list of non-empty prompts")
                suffix = column_part(category)
                if not suffix or suffix in suffixes:
                    raise ValueError(f"stages.score.taxonomy.{category}: name clashes with '{suffixes.get(suffix)}'")
                suffixes[suffix] = category
        return value

    def categories(self) -> dict[str, list[str]]:
        if isinstance(self.taxonomy, str):
            return dict(TAXONOMIES.get(self.taxonomy)())
        return dict(self.taxonomy)


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Torch on one CPU thread for the block: a tower's sums run in an order set by the thread count, so the
    prompt centroids of a Ray worker (threads = its cpus) and of an in-process run (all cores) would differ by
    ~1e-7 and score the same embeddings differently."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ScoreStage(Stage):
    name = "score"
    Config = ScoreConfig
    inputs = {"embed": ("key", "image_embedding", "text_embedding"), "source": ("key", "category")}
    output_columns = ("key", "alignment", "image_unsafe_score", "text_unsafe_score", "label_role", "label_category")
    recipe_sections = ("model",)
    version = "2"  # 2: labels read strictly (safe_values), unscored images as partial outputs

    config: ScoreConfig

    def output_schema(self) -> pa.Schema:
        c = self.config
        categories = list(c.categories())
        return schema(fields("key", "alignment"),
                      fields("{e}_score_{c}", "{e}_unsafe_score", "{e}_top_category", c=categories),
                      fields("{x}", x=[k.column() for k in c.classifiers]),
                      fields("label_role", "label_category", "label_source"),
                      fields("probe_{e}_score_{c}", c=categories) if c.probe else [])  # fmt: skip

    def __init__(self, config: StageConfig, sections):
        super().__init__(config, sections)
        self.role_column = resolve_role_column(self.config.role_column, sections.get("source"))
        extra = (self.role_column,) if self.role_column else ()
        if self.config.classifiers:
            extra += ("image",)
        self.inputs = {"embed": ("key", "image_embedding", "text_embedding"), "source": ("key", "category", *extra)}

    def prepare(self, progress, workdir: WorkDir) -> None:
        """With ``probe: true``: fit the cross-fitted probes on the driver, once, before the workers start."""
        if not self.config.probe:
            return
        from saferclip_data.stages.probe import fit_probes, probe_label, save_probes

        shard_ids = workdir.completed_shards("embed")
        advance = progress.subtask("fit safety probe", len(shard_ids) + 1)
        parts = []
        for shard_id in shard_ids:
            parts.append(workdir.read_aligned(shard_id, self.inputs))
            advance(1)
        table = pa.concat_tables(parts)
        labels = self.labels(table)
        classes = ["safe", *self.config.categories()]
        y = np.array(
            [
                -1 if (lab := probe_label(r, c, classes)) is None else lab
                for r, c in zip(labels["label_role"].to_pylist(), labels["label_category"].to_pylist())
            ]
        )
        dim = table.schema.field("text_embedding").type.list_size
        vectors, y_of = {}, {}
        for modality in ("image", "text"):
            x, valid = unit_rows(table[f"{modality}_embedding"], dim)
            vectors[modality] = x
            y_of[modality] = np.where(valid, y, -1)  # a text-only record trains the text probe only
            if (y_of[modality] >= 0).sum() == 0:
                raise UserError("stages.score.probe: no labelled records (set role_column or a category column)")
        try:
            arrays, summary = fit_probes(
                vectors, y_of, table["key"].to_pylist(), classes, self.config.probe_folds, self.config.probe_c
            )
        except ValueError as exc:
            raise UserError(f"stages.score.probe: {exc}") from exc
        save_probes(workdir.stage_dir(self.name), arrays, summary)
        advance(1)

    def setup(self) -> None:
        import torch
        import torch.nn.functional as F

        model_cfg: ModelConfig = self.sections["model"]
        self.clip, model, device, _ = load_worker_model(model_cfg, self.config.device, self.config.precision, "score")
        self.categories = list(self.config.categories())
        with one_cpu_thread(), torch.inference_mode():

            def centroid(prompts: list[str]) -> np.ndarray:
                tokens = trim_tokens(model, self.clip.tokenizer(prompts)).to(device)
                feats = F.normalize(encode_text(model, tokens).float(), dim=-1)
                return F.normalize(feats.mean(0), dim=0).cpu().numpy()

            self.category_matrix = np.stack([centroid(p) for p in self.config.categories().values()])
            self.neutral = centroid(self.config.neutral_prompts)
            self.scale = float(model.logit_scale.exp().float().item()) if hasattr(model, "logit_scale") else 100.0
        if self.config.classifiers:
            from saferclip_data.stages.classifiers import ImageClassifier

            self.classifiers = [ImageClassifier(c, torch.get_num_threads(), device) for c in self.config.classifiers]

    def output_metadata(self) -> dict[str, str]:
        meta = {
            "model_identity": self.clip.identity,
            "categories": "|".join(self.categories),
            "logit_scale": f"{self.scale:.4f}",
        }
        if self.config.classifiers:  # what the report needs to read their columns
            meta["classifiers"] = json.dumps({c.column(): {"category": c.category, "threshold": c.threshold,
                                                           "decoder": "pil"}
                                              for c in self.config.classifiers}, sort_keys=True)  # fmt: skip
        if getattr(self, "probes", None) is not None:
            s = self.probes.summary
            meta["probe"] = json.dumps({k: s[k] for k in ("labelled", "folds", "accuracy")}, sort_keys=True)
        return meta

    def read_shard(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        if self.config.probe and getattr(self, "probes", None) is None:
            from saferclip_data.stages.probe import Probes

            self.probes = Probes(workdir.stage_dir(self.name))
        if self.config.classifiers and "image" not in workdir.shard_columns("source", spec.shard_id):
            raise UserError("stages.score.classifiers: the source has no image bytes to classify (an embeddings "
                            "source keeps image URLs only)")  # fmt: skip
        table = super().read_shard(spec, workdir)
        embedded_with = (workdir.manifest("embed") or {}).get("metadata", {}).get("model_identity")
        if embedded_with and embedded_with != self.clip.identity:
            raise ModelIdentityError(
                f"stage score: embeddings were made with {embedded_with} but the recipe's model is "
                f"{self.clip.identity}; re-run embed with this model or score with that one"
            )
        return table

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """(n, categories) unsafe scores of unit vectors."""
        margin = vectors @ self.category_matrix.T - (vectors @ self.neutral)[:, None]
        return 1.0 / (1.0 + np.exp(-self.scale * margin))

    def process_batch(self, batch: pa.Table) -> BatchResult:
        dim = len(self.neutral)
        images, has_image = unit_rows(batch["image_embedding"], dim)
        texts, has_text = unit_rows(batch["text_embedding"], dim)
        columns: dict[str, pa.Array] = {"key": batch["key"]}
        partial: list[Reject] = []
        alignment = np.einsum("ij,ij->i", images, texts)
        columns["alignment"] = pa.array(alignment.astype(np.float32), mask=~(has_image & has_text))
        for modality, vectors, valid in (("image", images, has_image), ("text", texts, has_text)):
            scores = self.scores(vectors).astype(np.float32)
            for c, category in enumerate(self.categories):
                columns[f"{modality}_score_{column_part(category)}"] = pa.array(scores[:, c], mask=~valid)
            columns[f"{modality}_unsafe_score"] = pa.array(scores.max(1), mask=~valid)
            top = np.array(self.categories, dtype=object)[scores.argmax(1)]
            columns[f"{modality}_top_category"] = pa.array(top.tolist(), pa.string(), mask=~valid)
        if self.config.classifiers:
            from saferclip_data.models.decode import byte_views

            blobs = byte_views(batch["image"])
            keys = batch["key"].to_pylist()
            for classifier in self.classifiers:
                values, unscored = classifier.scores(blobs)
                name = classifier.config.column()
                columns[name] = pa.array(values, pa.float32(), mask=np.isnan(values))
                partial += [Reject(keys[i], f"{name} not scored (image does not decode)", error)
                            for i, error in sorted(unscored.items())]  # fmt: skip
        labels = self.labels(batch)
        columns.update(labels)
        if self.config.probe:
            from saferclip_data.stages.probe import probe_label

            classes = ["safe", *self.categories]
            labelled = np.array(
                [
                    probe_label(r, c, classes) is not None
                    for r, c in zip(labels["label_role"].to_pylist(), labels["label_category"].to_pylist())
                ]
            )
            keys = batch["key"].to_pylist()
            for modality, vectors, valid in (("image", images, has_image), ("text", texts, has_text)):
                p = self.probes.probabilities(modality, vectors, keys, labelled & valid)
                for c, category in enumerate(self.categories):
                    columns[f"probe_{modality}_score_{column_part(category)}"] = pa.array(p[:, c + 1], mask=~valid)
        return BatchResult(pa.table(columns), partial=partial)

    def labels(self, batch: pa.Table) -> dict[str, pa.Array]:
        """The user's own labels, normalised: role (safe/unsafe/null), category, and where they came from."""
        n = batch.num_rows
        roles: list[str | None] = [None] * n
        sources: list[str | None] = [None] * n
        role_column = self.role_column
        unsafe_values = {v.strip().lower() for v in self.config.unsafe_values}
        safe_values = {v.strip().lower() for v in self.config.safe_values}
        if role_column:
            keys = batch["key"].to_pylist() if "key" in batch.column_names else [None] * n
            for i, value in enumerate(batch[role_column].to_pylist()):
                text = "" if value is None else str(value).strip().lower()
                if not text:
                    continue
                if text in unsafe_values:
                    roles[i] = "unsafe"
                elif text in safe_values:
                    roles[i] = "safe"
                else:  # a label we cannot read must not become "safe" (or be ignored) behind the user's back
                    raise UserError(
                        f"stages.score.role_column: source column '{role_column}' holds {str(value)!r} (record "
                        f"{keys[i]}), neither a safe nor an unsafe value: list it in stages.score.safe_values or "
                        "unsafe_values, or set role_column: null to take roles from the scores"
                    )
                sources[i] = f"source.{role_column}"
        categories: list[str | None] = [None] * n
        if self.config.category_labels:
            for i, value in enumerate(batch["category"].to_pylist()):
                if value not in (None, ""):
                    categories[i] = str(value)
                    if roles[i] is None:
                        roles[i], sources[i] = "unsafe", "source.category"
        return {
            "label_role": pa.array(roles, pa.string()),
            "label_category": pa.array(categories, pa.string()),
            "label_source": pa.array(sources, pa.string()),
        }
