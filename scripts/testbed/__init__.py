"""The emulated edge cluster behind `scripts/edge-testbed` (stdlib only; see docs/testbed.md)."""
