"""The `moe-serve` command: make a synthetic checkpoint, inspect one and plan placement, verify a gateway."""
