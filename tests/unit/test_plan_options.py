"""`dsparse plan` checks every option before it measures anything (issue #16: `--headroom 15`
used to measure the model for up to 100 s before saying the option was out of range)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,message", [
    (["--headroom", "15"], "headroom 15.0 is out of range"),
    (["--importance", "bogus"], "unknown importance 'bogus'"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--sync-every", "0"], "--sync-every 0 must be at least 1"),
    (["--num-classes", "1"], "--num-classes 1 must be at least 2"),
    (["--objective", "speed"], "unknown objective 'speed'"),
    (["--objective", "time"], "--objective time needs every board's link rate; board demo-x86 has none"),
])
def test_a_bad_option_fails_before_torch_or_measuring(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dsparse_cli", "plan", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
    assert not (tmp_path / ".dsparse" / "profiles").exists() and not (tmp_path / ".dsparse" / "plan.json").exists()
