"""Write one benchmark's section of BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import time
from pathlib import Path

HEADER = "# lowbit benchmarks\n\nEach section is written by the script named in it; re-run the command to refresh it.\n"


def replace_section(path: Path, key: str, title: str, body: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    section = f"{begin}\n## {title}\n\n_Recorded {stamp}._\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
