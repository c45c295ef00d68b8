"""lm-evaluation-harness task definitions for the bundled benchmarks: one YAML per task, the
`hhh` group, and `utils.py` (loaders and scoring functions the YAMLs name). `harness.py` loads
this folder with `TaskManager(include_path=...)`; nothing here reads anything but the package's
own data files."""
