"""Process plumbing, a leaf that anyone may import and that imports nothing of ours: MOE_* environment
defaults, torch threads, OpenMP's spin, devices, malloc tuning, console output, thread and event-loop hand-offs."""
