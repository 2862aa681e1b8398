"""What the launcher next to each worker costs a board: dsparse's supervisor vs torchrun's agent.

    .venv/bin/python bench/launcher_memory.py [--json]

Each figure is the private (anonymous) resident memory of a fresh interpreter that has imported
what that launcher imports, measured as `dsparse plan` measures it for every budget
(`planning.profile.measure_launcher_bytes`); file-backed pages are the libraries the worker maps
anyway. Target (issue #13): at least 250 MiB less per board with this torch build.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsparse_cli.planning.profile import measure_launcher_bytes  # noqa: E402

MiB = 1 << 20
TARGET_SAVING_MIB = 250


def main() -> int:
    import torch

    found = {kind: measure_launcher_bytes(kind) / MiB for kind in ("dsparse", "torchrun")}
    saving = found["torchrun"] - found["dsparse"]
    doc = {"torch": torch.__version__, "private_mib": found, "saving_mib": saving,
           "target_saving_mib": TARGET_SAVING_MIB, "met": saving >= TARGET_SAVING_MIB}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "launcher_memory.json").write_text(json.dumps(doc, indent=1))
    if "--json" in sys.argv:
        print(json.dumps(doc, indent=1))
    else:
        print(f"torch {doc['torch']}: dsparse's launcher {found['dsparse']:.1f} MiB, torchrun's agent "
              f"{found['torchrun']:.1f} MiB of private memory per board: {saving:.1f} MiB saved "
              f"(target >= {TARGET_SAVING_MIB} MiB: {'met' if doc['met'] else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
