"""A stage written from ARCHITECTURE.md's "Adding a stage" alone, kept as a test that the section stays true."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from saferclip_data.cli.common import recipe_sections
from saferclip_data.pipeline.executors import LocalExecutor
from saferclip_data.pipeline.progress import BuildProgress
from saferclip_data.pipeline.recipe import load_recipe
from saferclip_data.pipeline.runner import Pipeline
from saferclip_data.pipeline.stage import BatchResult, Reject, Stage, StageConfig
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages import REGISTRY

from conftest import recipe_dict, write_recipe


# ---- the example: 24 lines ------------------------------------------------------------------------------------
class CaptionWordsConfig(StageConfig):
    min_words: int = Field(default=1, ge=0, description="records with fewer caption words are rejected")


class CaptionWordsStage(Stage):
    """Counts each caption's words; rejects records whose caption is missing or too short."""

    name = "caption_words"
    Config = CaptionWordsConfig
    inputs = {"source": ("key", "caption")}
    version = "1"

    def output_schema(self) -> pa.Schema:
        return pa.schema([("key", pa.string()), ("words", pa.int32())])

    def process_batch(self, batch: pa.Table) -> BatchResult:
        words = pc.list_value_length(pc.utf8_split_whitespace(pc.fill_null(batch["caption"], ""))).cast(pa.int32())
        keep = pc.greater_equal(words, self.config.min_words)
        rejects = [Reject(key, "too few caption words", f"{n} < {self.config.min_words}")
                   for key, n, ok in zip(batch["key"].to_pylist(), words.to_pylist(), keep.to_pylist()) if not ok]
        table = pa.table({"key": batch["key"], "words": words}).filter(keep)
        return BatchResult(table, rejects)


# ---- its tests --------------------------------------------------------------------------------------------------
def test_the_example_stage_core_without_ray():
    stage = CaptionWordsStage(CaptionWordsConfig(min_words=2), {})
    result = stage.process_batch(pa.table({"key": ["a", "b", "c"], "caption": ["two words", "one", None]}))
    assert result.table.to_pylist() == [{"key": "a", "words": 2}]
    assert [(r.key, r.reason) for r in result.rejects] == [("b", "too few caption words"),
                                                           ("c", "too few caption words")]


def test_the_example_stage_builds_resumes_and_reports(tmp_path, manifest_200):
    registry = {"source": REGISTRY["source"], "caption_words": CaptionWordsStage}
    data = recipe_dict(manifest_200)
    data["stages"] = {"caption_words": {"min_words": 3}}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data), recipe_sections(), registry)
    pipeline = Pipeline(recipe, registry, WorkDir(tmp_path / "w"))
    for expected in (["ran", "ran"], ["up to date", "up to date"]):
        with BuildProgress(console=None, enabled=False) as bars:
            assert [o.status for o in pipeline.build(LocalExecutor(), bars)] == expected
    wd = WorkDir(tmp_path / "w")
    out = wd.read_stage_columns("caption_words", ["key", "words"])
    rejects = wd.rejects("caption_words")
    assert out.num_rows + rejects.num_rows == 200 and out.num_rows > 0
    assert min(out["words"].to_pylist()) >= 3 and set(rejects["reason"].to_pylist()) <= {"too few caption words"}
    assert wd.manifest("caption_words")["schema"] == {"key": "string", "words": "int32"}
