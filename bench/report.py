"""How every benchmark hands over its result: indented JSON on stdout, and the same into ``--output`` if given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], output: str | Path | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
