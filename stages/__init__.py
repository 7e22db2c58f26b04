"""Stages of the safety-data pipeline, in pipeline order, and the recipe sections they read."""

from __future__ import annotations

from saferclip_data.pipeline.stage import Stage
from saferclip_data.training.train_cli import EvaluationSection, TrainingSection

from .benchmark import BenchmarkStage
from .dedup import DedupStage
from .embed import EmbedStage, ModelConfig
from .filter import FilterStage
from .mine import MineStage
from .neighbours import NeighboursStage
from .report import ReportStage
from .score import ScoreStage
from .shards import ShardsStage
from .source import SourceConfig, SourceStage

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

#: top-level recipe sections besides ``stages``: name -> (model, required)
SECTIONS = {
    "source": (SourceConfig, True),
    "model": (ModelConfig, True),
    "training": (TrainingSection, False),
    "evaluation": (EvaluationSection, False),
}

__all__ = ["REGISTRY", "SECTIONS", "EmbedStage", "SourceStage", "ModelConfig", "SourceConfig"]
