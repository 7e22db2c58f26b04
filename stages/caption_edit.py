"""Minimal caption edits from an LLM behind an OpenAI-compatible chat endpoint (vLLM, TGI, Ollama, ...).

NSFW-Caps was made by asking an LLM to add one unsafe element of a given category to each safe caption; the
same request in reverse gives a safe rewrite of an unsafe caption. The source stage uses this module to derive
such records (``source.caption_edit``): each derived record keeps its origin's group, so the two form a pair.

Requests run concurrently, are retried with exponential backoff by the openai client (429s, 5xx, timeouts),
and every answer is cached on disk under the hash of everything that shapes it (model, prompts, temperature,
input), so a rerun asks nothing twice (only requests that failed are asked again). A bad answer (empty, equal
to the input, too long) or a failed request becomes a reject of the derived record with the reason; the
record it came from is untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from saferclip_data.pipeline.recipe import resolve_path
from saferclip_data.pipeline.workdir import atomic_write_text

UNSAFE_EDIT_PROMPT = (
    "Rewrite the image caption below by adding exactly one element of the category '{category}' so that it "
    "describes unsafe content. Change as little as possible and keep everything else. Reply with the new "
    "caption only.\n\nCaption: {caption}"
)
SAFE_REWRITE_PROMPT = (
    "The image caption below describes unsafe content of the category '{category}'. Rewrite it into the closest "
    "safe caption: remove only the unsafe element and keep everything else. Reply with the new caption only."
    "\n\nCaption: {caption}"
)
SYSTEM_PROMPT = "You write image captions for a dataset that trains safety classifiers. Answer with one caption."


class CaptionEditOptions(BaseModel):
    """``source.caption_edit``: derive an edited twin of each safe (or unsafe) caption through an LLM."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["unsafe_edit", "safe_rewrite"] = Field(
        default="unsafe_edit", description="unsafe_edit: safe captions get an unsafe twin; safe_rewrite: reverse"
    )
    endpoint: str = Field(description="base URL of the OpenAI-compatible API, e.g. http://localhost:8000/v1")
    model: str = Field(description="model name the endpoint serves")
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    categories: list[str] = Field(
        default_factory=lambda: ["violence", "self-harm", "sexual", "hate", "harassment", "shocking",
                                 "illegal activity"],
        min_length=1,
        description="unsafe categories, assigned to records in turn (by key hash) unless the record has one",
    )  # fmt: skip
    prompt: str | None = Field(default=None, description="user prompt with {caption} and {category}")
    system_prompt: str = SYSTEM_PROMPT
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=120, gt=0)
    max_length_ratio: float = Field(default=3.0, gt=1, description="answers longer than this × the input fail")
    concurrency: int = Field(default=8, gt=0)
    retries: int = Field(default=4, ge=0, description="per request, with exponential backoff")
    timeout: float = Field(default=60.0, gt=0)
    cache_dir: str | None = Field(default=None, description="answer cache (default: the saferclip cache)")

    _cache_dir = field_validator("cache_dir")(resolve_path)

    def user_prompt(self) -> str:
        return self.prompt or (UNSAFE_EDIT_PROMPT if self.mode == "unsafe_edit" else SAFE_REWRITE_PROMPT)

    def result_settings(self) -> dict:
        """What changes the answers (for the fingerprint): not where the server is or how fast it is asked."""
        return self.model_dump(include={"mode", "model", "categories", "prompt", "system_prompt", "temperature",
                                        "max_tokens", "max_length_ratio"})  # fmt: skip


def category_for(key: str, categories: list[str]) -> str:
    """A stable category per record (its key's hash), spread evenly over the list."""
    return categories[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(categories)]


def prompt_hash(options: CaptionEditOptions, caption: str, category: str) -> str:
    payload = [options.model, options.system_prompt, options.user_prompt(), options.temperature, options.max_tokens,
               caption, category]  # fmt: skip
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def validate(answer: str | None, caption: str, options: CaptionEditOptions) -> tuple[str | None, str | None]:
    """(clean answer, None) or (None, why it fails)."""
    text = (answer or "").strip().strip('"“”').strip()
    if text.lower().startswith("caption:"):
        text = text[len("caption:") :].strip()
    if not text:
        return None, "empty answer"
    if " ".join(text.lower().split()) == " ".join(caption.lower().split()):
        return None, "answer equals the input"
    if len(text) > options.max_length_ratio * max(len(caption), 20):
        return None, f"answer too long ({len(text)} characters for a {len(caption)}-character input)"
    return text, None


def with_edit_rows(table: pa.Table, o: CaptionEditOptions, unsafe_labels: frozenset[str]) -> pa.Table:
    """Append one derived row per eligible record (safe ones for unsafe_edit, unsafe ones for safe_rewrite):
    same group, split and other extras, no image, the caption to edit in ``_edit_of``."""
    unsafe_edit = o.mode == "unsafe_edit"
    rows = table.to_pylist()
    derived = []
    for row in rows:
        is_unsafe = str(row["label"] or "").strip().lower() in unsafe_labels
        if row["_reason"] or not row["caption"] or is_unsafe == unsafe_edit:
            continue
        key = f"{row['key']}-edit"
        derived.append({**row, "key": key, "caption": None, "image": None,
                        "label": "unsafe" if unsafe_edit else "safe",
                        "category": row["category"] or category_for(key, o.categories),
                        "_edit_of": row["caption"]})  # fmt: skip
    edit_of = pa.nulls(table.num_rows, pa.string())
    table = table.append_column("_edit_of", edit_of)
    if not derived:
        return table
    return pa.concat_tables([table, pa.Table.from_pylist(derived, schema=table.schema)])


class CaptionEditor:
    """Asks the endpoint for edits, with the on-disk cache in front; ``requests`` counts what was really sent."""

    def __init__(self, options: CaptionEditOptions, cache_dir: Path):
        self.options = options
        self.cache_dir = cache_dir
        self.requests = 0
        self._client = None

    def _ask(self, caption: str, category: str) -> str:
        from openai import OpenAI

        o = self.options
        if self._client is None:
            key = os.environ.get(o.api_key_env, "") if o.api_key_env else ""
            self._client = OpenAI(base_url=o.endpoint, api_key=key or "not-needed", max_retries=o.retries,
                                  timeout=o.timeout)  # fmt: skip
        self.requests += 1
        response = self._client.chat.completions.create(
            model=o.model,
            messages=[
                {"role": "system", "content": o.system_prompt},
                {"role": "user", "content": o.user_prompt().format(caption=caption, category=category)},
            ],
            temperature=o.temperature,
            max_tokens=o.max_tokens,
        )
        return response.choices[0].message.content or ""

    def edit_one(self, caption: str, category: str) -> tuple[str | None, str | None]:
        """(edited caption, None) or (None, reason). Every answer the endpoint gave is cached, good or bad (at a
        fixed temperature asking again would not change it); failed requests are not, so a rerun retries them."""
        path = self.cache_dir / f"{prompt_hash(self.options, caption, category)}.json"
        if path.is_file():
            answer = json.loads(path.read_text())["answer"]
        else:
            try:
                answer = self._ask(caption, category)
            except Exception as exc:  # the client already retried with backoff; the record fails with the reason
                first = str(exc).splitlines()[0] if str(exc) else ""
                return None, f"request failed after {self.options.retries} retries: {type(exc).__name__}: {first}"[:300]
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"caption": caption, "category": category, "answer": answer}))
        text, why = validate(answer, caption, self.options)
        return (text, None) if text is not None else (None, f"{why}: {answer!r:.120}")

    def edit_many(self, items: list[tuple[str, str]]) -> list[tuple[str | None, str | None]]:
        """[(caption, category)] -> [(answer or None, reason or None)], in order, ``concurrency`` at a time."""
        with ThreadPoolExecutor(self.options.concurrency) as pool:
            return list(pool.map(lambda item: self.edit_one(*item), items))
