"""Framework integrations of allora-trl, one sub-package per framework (installed as ``allora_trl.integrations``)."""
