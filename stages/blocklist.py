"""Image-byte blocklists: known-bad images (hash lists shared by safety teams) removed at ingestion.

A blocklist is a text file with one hex digest per line: sha256 (64 hex digits) or md5 (32), optionally
prefixed ``sha256:`` / ``md5:``; blank lines and ``#`` comments are ignored. Matching records are rejected by the
source stage with reason ``blocklisted`` and the matching digest as the error text, so the removal is auditable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError

DIGEST_LENGTH = {"sha256": 64, "md5": 32}


@dataclass(frozen=True)
class Blocklist:
    sha256: frozenset[str]
    md5: frozenset[str]

    def __len__(self) -> int:
        return len(self.sha256) + len(self.md5)

    def match(self, data: bytes) -> str | None:
        """The matching ``algorithm:digest``, or None. md5 is computed only when the list has md5 entries."""
        if self.sha256:
            digest = hashlib.sha256(data).hexdigest()
            if digest in self.sha256:
                return f"sha256:{digest}"
        if self.md5:
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest in self.md5:
                return f"md5:{digest}"
        return None


def load_blocklist(path: str | Path) -> Blocklist:
    """Parse a blocklist file; a malformed line is a one-line error naming the file and line number."""
    path = str(path)
    try:
        lines = storage.read_bytes(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"source.blocklist: cannot read {path}: {exc}") from None
    found: dict[str, set[str]] = {"sha256": set(), "md5": set()}
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        algorithm, _, digest = line.rpartition(":")
        if not algorithm:
            algorithm = next((a for a, n in DIGEST_LENGTH.items() if n == len(digest)), "")
        valid = algorithm in DIGEST_LENGTH and len(digest) == DIGEST_LENGTH[algorithm]
        if not valid or any(ch not in "0123456789abcdef" for ch in digest):
            raise UserError(
                f"source.blocklist: {path} line {number}: expected a sha256 (64 hex digits) or md5 (32) digest, "
                f"got {raw.strip()!r:.80}"
            )
        found[algorithm].add(digest)
    return Blocklist(frozenset(found["sha256"]), frozenset(found["md5"]))
