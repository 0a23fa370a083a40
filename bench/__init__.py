"""The benchmarks: each one a script (``python bench/<name>.py`` or ``python -m bench.<name>``);
what they share is :mod:`bench.common`."""
