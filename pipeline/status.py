"""Read a work dir back: per stage shards done/pending, record counts and rejects by reason."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.compute as pc

from saferclip_data.pipeline.workdir import WorkDir


def stage_status(workdir: WorkDir, order: list[str]) -> list[dict[str, Any]]:
    """One row per stage folder present, in pipeline order; counts come from the shard markers and the
    rejects tables themselves, so they are right for a stage that is still running or crashed."""
    rows = []
    for name in order:
        manifest = workdir.manifest(name)
        if manifest is None:
            continue
        shards = manifest.get("shards", [])
        stats = [workdir.shard_stats(name, s) for s in shards]
        done = [s for s in stats if s is not None]
        # only shards with a marker count: a crash may leave outputs of an unfinished shard behind
        rejects = workdir.rejects(name, [s["shard"] for s in done])
        reasons = Counter(dict(zip(*[c.to_pylist() for c in pc.value_counts(rejects["reason"]).flatten()])))
        partial: Counter = Counter()
        for s in done:
            partial.update(s.get("partial_by_reason", {}))
        if manifest.get("mode") == "global":
            counts = manifest.get("counts", {})
            state = "done" if manifest.get("complete") else "pending"
            rows.append(
                {
                    "stage": name,
                    "state": state,
                    "shards_done": int(bool(manifest.get("complete"))),
                    "shards_pending": int(not manifest.get("complete")),
                    "in": counts.get("in", 0),
                    "out": counts.get("out", 0),
                    "rejected": len(rejects),
                    "rejects_by_reason": dict(sorted(reasons.items())),
                    "partial": sum(partial.values()),
                    "partial_by_reason": dict(sorted(partial.items())),
                }
            )
            continue
        rows.append(
            {
                "stage": name,
                "state": "done" if manifest.get("complete") else "partial",
                "shards_done": len(done),
                "shards_pending": len(shards) - len(done),
                "in": sum(s["in"] for s in done),
                "out": sum(s["out"] for s in done),
                "rejected": sum(s["rejected"] for s in done),
                "rejects_by_reason": dict(sorted(reasons.items())),
                "partial": sum(partial.values()),
                "partial_by_reason": dict(sorted(partial.items())),
                "model_identity": manifest.get("metadata", {}).get("model_identity"),
            }
        )
    return rows
