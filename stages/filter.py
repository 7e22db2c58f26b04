"""The filter stage: declarative keep/reject rules over stored scores, and each record's safe/unsafe role.

Nothing here recomputes a score: the rules read the score stage's columns (and source columns), so changing a
threshold re-runs this stage and what follows, never embed or score. Every rule has a stable reason string
(``"text_score_violence above 0.9"``: the manifest counts rejects by it) and the offending value goes into the
reject's error text.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import BatchResult, Reject, ShardSpec, Stage, StageConfig
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.columns import fields, schema

#: score-stage columns the filter always reads
BASE_SCORE_COLUMNS = (
    "alignment",
    "image_unsafe_score",
    "text_unsafe_score",
    "image_top_category",
    "text_top_category",
    "label_role",
    "label_category",
)


class Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}: no record could pass")
        return self


class Rule(BaseModel):
    """Keep a record only if ``column`` lies within [min, max]; ``role`` limits the rule to safe or unsafe."""

    model_config = ConfigDict(extra="forbid")
    column: str = Field(description="a score-stage column (text_score_violence, alignment, ...) or a source column")
    min: float | None = None
    max: float | None = None
    role: Literal["any", "safe", "unsafe"] = "any"
    missing: Literal["keep", "reject"] = Field(default="keep", description="what a null value means")

    @model_validator(mode="after")
    def _bounded(self):
        if self.min is None and self.max is None:
            raise ValueError(f"rule on '{self.column}': give min, max or both")
        return self

    def reason(self, value: float | None) -> str | None:
        """None when the value passes, else the stable reason string."""
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return f"{self.column} missing" if self.missing == "reject" else None
        if self.min is not None and value < self.min:
            return f"{self.column} below {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{self.column} above {self.max:g}"
        return None


class FilterConfig(StageConfig):
    role_from: Literal["auto", "labels", "scores"] = Field(
        default="auto", description="labels: the user's labels; scores: unsafe_threshold; auto: labels where given"
    )
    unsafe_threshold: float = Field(
        default=0.5, ge=0, le=1, description="a record without a label is unsafe when its top score reaches this"
    )
    min_alignment: float | None = Field(default=None, description="image-caption cosine below this is rejected")
    caption_words: Bounds = Field(default_factory=Bounds, description="caption length bounds, in words")
    safe_max_score: float | None = Field(
        default=None, description="a record labelled safe whose top unsafe score exceeds this is rejected"
    )
    unsafe_min_score: float | None = Field(
        default=None, description="a record labelled unsafe whose top unsafe score stays below this is rejected"
    )
    rules: list[Rule] = Field(default_factory=list, description="further bounds on any score or source column")


class FilterStage(Stage):
    name = "filter"
    Config = FilterConfig
    inputs = {"score": ("key", *BASE_SCORE_COLUMNS), "source": ("key", "caption")}
    output_columns = ("key", "role", "category", "role_source", "unsafe_score")
    version = "2"  # 2: the unsafe threshold in the output metadata

    config: FilterConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields(*self.output_columns))

    def __init__(self, config: StageConfig, sections):
        super().__init__(config, sections)
        self.rule_columns = sorted({r.column for r in self.config.rules})

    def output_metadata(self) -> dict[str, str]:
        """The threshold that turns a score into a role, so the report can hold the labels against it."""
        return {"unsafe_threshold": f"{self.config.unsafe_threshold:g}", "role_from": self.config.role_from}

    def read_shard(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        score_names = set(workdir.shard_columns("score", spec.shard_id))
        source_names = set(workdir.shard_columns("source", spec.shard_id))
        from_score, from_source = [], []
        for column in self.rule_columns:
            if column in score_names:
                from_score.append(column)
            elif column in source_names:
                from_source.append(column)
            else:
                index = next(n for n, r in enumerate(self.config.rules) if r.column == column)
                known = ", ".join(sorted(score_names - {"key"}))
                raise UserError(f"stages.filter.rules[{index}].column: no column '{column}' (score columns: {known})")
        inputs = {
            "score": ("key", *BASE_SCORE_COLUMNS, *from_score),
            "source": ("key", "caption", *from_source),
        }
        return workdir.read_aligned(spec.shard_id, inputs)

    def process_batch(self, batch: pa.Table) -> BatchResult:
        c = self.config
        rows = batch.to_pylist()
        kept: list[dict] = []
        rejects: list[Reject] = []
        for row in rows:
            top, top_category = _top_score(row)
            label = row["label_role"]
            if c.role_from == "labels" and label is None:
                rejects.append(Reject(row["key"], "no safe/unsafe label", "role_from is 'labels'"))
                continue
            if label is not None and c.role_from != "scores":
                role, role_source = label, "label"
            elif top is None:
                rejects.append(Reject(row["key"], "no label and no score", ""))
                continue
            else:
                role, role_source = ("unsafe" if top >= c.unsafe_threshold else "safe"), "scores"
            reason, detail = self._first_failure(row, role, role_source, top)
            if reason:
                rejects.append(Reject(row["key"], reason, detail))
                continue
            category = (row["label_category"] or top_category) if role == "unsafe" else None
            kept.append(
                {"key": row["key"], "role": role, "category": category, "role_source": role_source, "unsafe_score": top}
            )
        schema = pa.schema(
            [
                ("key", pa.string()),
                ("role", pa.string()),
                ("category", pa.string()),
                ("role_source", pa.string()),
                ("unsafe_score", pa.float32()),
            ]
        )
        return BatchResult(pa.Table.from_pylist(kept, schema=schema), rejects)

    def _first_failure(self, row: dict, role: str, role_source: str, top: float | None) -> tuple[str, str]:
        c = self.config
        if role_source == "label" and top is not None:
            if role == "safe" and c.safe_max_score is not None and top > c.safe_max_score:
                return "labelled safe but scores unsafe", f"top unsafe score {top:.3f} > {c.safe_max_score:g}"
            if role == "unsafe" and c.unsafe_min_score is not None and top < c.unsafe_min_score:
                return "labelled unsafe but scores safe", f"top unsafe score {top:.3f} < {c.unsafe_min_score:g}"
        if c.min_alignment is not None and row["alignment"] is not None and row["alignment"] < c.min_alignment:
            return f"alignment below {c.min_alignment:g}", f"{row['alignment']:.3f}"
        words = len((row["caption"] or "").split())
        if c.caption_words.min is not None and words < c.caption_words.min:
            return f"caption shorter than {c.caption_words.min:g} words", f"{words} words"
        if c.caption_words.max is not None and words > c.caption_words.max:
            return f"caption longer than {c.caption_words.max:g} words", f"{words} words"
        for rule in c.rules:
            if rule.role != "any" and rule.role != role:
                continue
            value = row[rule.column]
            reason = rule.reason(None if value is None else float(value))
            if reason:
                return reason, f"{rule.column} = {value}"
        return "", ""


def _top_score(row: dict) -> tuple[float | None, str | None]:
    """The larger of the image and text top unsafe scores, with its category."""
    best, category = None, None
    for modality in ("image", "text"):
        score = row[f"{modality}_unsafe_score"]
        if score is not None and (best is None or score > best):
            best, category = float(score), row[f"{modality}_top_category"]
    return best, category
