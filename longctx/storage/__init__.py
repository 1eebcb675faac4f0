"""What persists: the snapshot store (safetensors + JSON manifest, atomic), run checkpoints and resume checks,
the `memory` commands, trained adapters, and migrations of old records."""
