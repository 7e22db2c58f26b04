"""Stages of the safety-data pipeline, in pipeline order."""

from __future__ import annotations

from saferclip_data.pipeline.stage import Stage
from saferclip_data.stages.benchmark import BenchmarkStage
from saferclip_data.stages.dedup import DedupStage
from saferclip_data.stages.embed import EmbedStage, ModelConfig
from saferclip_data.stages.filter import FilterStage
from saferclip_data.stages.mine import MineStage
from saferclip_data.stages.neighbours import NeighboursStage
from saferclip_data.stages.report import ReportStage
from saferclip_data.stages.score import ScoreStage
from saferclip_data.stages.shards import ShardsStage
from saferclip_data.stages.source import SourceConfig, SourceStage

#: stage name -> class, in the order the runner executes them
REGISTRY: dict[str, type[Stage]] = {
    "source": SourceStage,
    "embed": EmbedStage,
    "score": ScoreStage,
    "filter": FilterStage,
    "dedup": DedupStage,
    "neighbours": NeighboursStage,
    "mine": MineStage,
    "benchmark": BenchmarkStage,
    "shards": ShardsStage,
    "report": ReportStage,
}

__all__ = ["REGISTRY", "EmbedStage", "SourceStage", "ModelConfig", "SourceConfig"]
