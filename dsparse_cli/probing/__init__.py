"""Board probe: `board_script.py` runs on the board (stdlib only), `parse.py` reads its JSON."""

from __future__ import annotations

import os

BOARD_SCRIPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "board_script.py")


def board_script_source() -> str:
    """The script's text, to pipe into `python3 - [args]` on a board."""
    with open(BOARD_SCRIPT_PATH, encoding="utf-8") as f:
        return f.read()
