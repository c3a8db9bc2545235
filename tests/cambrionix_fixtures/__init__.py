"""Transcripts of real Cambrionix output, pinned so the parser *and* the simulator answer to them.

Each `*.txt` file holds one exchange: `# key: value` header lines (source, model, ...), then the
command as `>> command`, then the reply lines exactly as documented. `*.wire` files hold raw bytes
as one Python-escaped string (CR, LF and the prompt's trailing space survive editors and git).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Transcript:
    name: str
    command: str
    lines: tuple[str, ...]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.meta["model"]


def load(name: str) -> Transcript:
    meta: dict[str, str] = {}
    command: str | None = None
    lines: list[str] = []
    for raw in (HERE / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        if command is None and raw.startswith("# "):
            key, _, value = raw[2:].partition(":")
            meta[key.strip()] = value.strip()
        elif command is None and raw.startswith(">> "):
            command = raw[3:]
        elif command is not None:
            lines.append(raw)
    assert command is not None, f"{name}: no '>> command' line"
    return Transcript(name, command, tuple(lines), meta)


def load_wire(name: str) -> bytes:
    lines = (HERE / f"{name}.wire").read_text(encoding="utf-8").split("\n")
    text = next(line for line in lines if line and not line.startswith("#"))
    return codecs.decode(text, "unicode_escape").encode("latin-1")


def all_transcripts() -> list[Transcript]:
    return [load(p.stem) for p in sorted(HERE.glob("*.txt"))]
