"""Start-up checks for multi-process training: reject the set-ups where ALLoRA's layer would not see whole A and B.

ALLoRA's rule runs inside each LoRA layer's forward/backward and reads that layer's ``lora_A`` / ``lora_B`` weights
directly (not through their own ``nn.Linear`` forward). That is exact whenever the weights are whole while the
layer runs, which holds for (tested in ``tests/distributed``):

* DDP and DeepSpeed ZeRO-1/2: every process holds whole weights;
* FSDP2 with transformer-layer (or default size-based) wrapping: A and B belong to the decoder layer's group and
  are all-gathered before it runs forward and again before its backward;
* DeepSpeed ZeRO-3: DeepSpeed all-gathers a partitioned parameter when it is read during a module's forward and
  registers it with that module, so it is whole again in backward.

It does not hold, and training would fail (or, worse, run on shards), for:

* FSDP1: transformers' ``Trainer`` wraps every trainable leaf module of a peft model (so each LoRA ``lora_A`` /
  ``lora_B`` ``nn.Linear``) as its own FSDP1 unit (peft's ``fsdp_auto_wrap_policy``). Such a unit is gathered only
  when its own forward runs, which ALLoRA never calls: the layer would see 1-D flat shards.
* FSDP2 with a size-based policy whose ``min_num_params`` is below the size of a LoRA matrix: the matrix becomes
  its own group, stays sharded, and the first matmul fails with "mixed torch.Tensor and DTensor".

And one launch mistake that silently breaks "equal to one process": several processes started (``WORLD_SIZE > 1``)
but accelerate seeing one (on a machine without GPUs, unless ``use_cpu=True``): each process trains alone.
"""

from __future__ import annotations

import os

FSDP2_CONFIG_HINT = (
    "use FSDP2: `fsdp_version: 2` in the accelerate config's fsdp_config (see "
    "example_configs/accelerate/fsdp2.yaml), or `fsdp_config={'version': 2}` in the training arguments"
)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _fsdp_plugin_settings(args, accelerator) -> dict | None:
    """``{"version", "auto_wrap_policy", "min_num_params"}`` of the FSDP in use, or None without FSDP.

    With an ``accelerator`` its state is the truth (on a machine without GPUs accelerate drops FSDP for multi-CPU
    DDP, and the plugin is then None). Without one: the training arguments, then the ``accelerate launch`` env.
    """
    if accelerator is not None:
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if plugin is None:
            return None
        policy = getattr(plugin, "auto_wrap_policy", None)
        policy_name = policy if isinstance(policy, str) else getattr(getattr(policy, "func", policy), "__name__", "")
        return {
            "version": int(getattr(plugin, "fsdp_version", 1)),
            "auto_wrap_policy": str(policy_name).upper(),
            "min_num_params": getattr(plugin, "min_num_params", None),
            "state_dict_type": str(getattr(plugin, "state_dict_type", "")).upper(),
        }
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args:
        return {
            "version": int(plugin_args.get("fsdp_version", 1)),
            "auto_wrap_policy": str(plugin_args.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper(),
            "min_num_params": plugin_args.get("min_num_params"),
            "state_dict_type": str(plugin_args.get("state_dict_type", "")).upper(),
        }
    if _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        min_params = os.environ.get("FSDP_MIN_NUM_PARAMS")
        return {
            "version": int(os.environ.get("FSDP_VERSION", "1")),  # accelerate's default when the config omits it
            "auto_wrap_policy": os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper(),
            "min_num_params": int(min_params) if min_params else None,
            "state_dict_type": os.environ.get("FSDP_STATE_DICT_TYPE", "").upper(),
        }
    return None


def _uses_deepspeed(args, accelerator) -> bool:
    """Whether DeepSpeed drives this run: the accelerator's state, else the training arguments or the launch env."""
    if accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return True
    return bool(getattr(args, "deepspeed", None)) or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED"))


def _lora_matrices(model):
    """``(name, numel)`` of every LoRA A/B ``nn.Linear`` (the modules a wrap policy could make their own group)."""
    from .model import iter_lora_layers

    for name, layer in iter_lora_layers(model):
        for attr in ("lora_A", "lora_B"):
            for adapter, linear in getattr(layer, attr).items():
                yield f"{name}.{attr}.{adapter}", linear.weight.numel()


def check_distributed_setup(args=None, accelerator=None, model=None) -> None:
    """Raise ``ValueError`` naming the setting and the fix if ALLoRA cannot train exactly in this set-up.

    Call it once the ``Accelerator`` exists and before ``accelerator.prepare`` (e.g. at the end of the trainer's
    ``__init__``): ``check_distributed_setup(self.args, self.accelerator, self.model)``. Every argument is optional;
    each one given enables more checks. Returns None when the set-up is fine (single process, DDP, FSDP2,
    DeepSpeed ZeRO-1/2/3).
    """
    fsdp = _fsdp_plugin_settings(args, accelerator)
    if fsdp is not None and fsdp["version"] == 1:
        raise ValueError(
            "ALLoRA does not support FSDP1 (fsdp_version 1, which is accelerate's default when `fsdp_version` is not "
            "set): transformers wraps each trainable LoRA A/B matrix as its own FSDP1 unit, which is gathered only when "
            "that matrix's own forward runs, so ALLoRA's layer would see sharded weights. Fix: "
            + FSDP2_CONFIG_HINT
            + "."
        )
    if getattr(args, "allora_scale", "gradient") == "update" and (
        fsdp is not None or _uses_deepspeed(args, accelerator)
    ):
        # update scaling rescales each process's step of whole A and B rows (core/update_scaling.py); FSDP and
        # DeepSpeed hand the optimizer flat or sharded partitions instead.
        raise ValueError(
            "allora_scale='update' needs whole LoRA weights in the optimizer, which FSDP and DeepSpeed shard or "
            "flatten. Fix: use allora_scale='gradient' (the paper's rule, exact under sharding), or train with DDP."
        )
    if fsdp is not None and "SHARDED_STATE_DICT" in fsdp.get("state_dict_type", ""):
        # transformers' save_model writes no adapter file under FSDP with SHARDED_STATE_DICT (only FULL_STATE_DICT
        # saves one): the run would end without a usable adapter. Gathering only the trainable LoRA weights would
        # lift this, but cannot be tested without GPUs; until then, fail before training.
        raise ValueError(
            "ALLoRA under FSDP needs `fsdp_state_dict_type: FULL_STATE_DICT`: with SHARDED_STATE_DICT transformers' "
            "save_model writes no adapter file, so the run would end without a usable adapter. Fix: set "
            "`fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config (see example_configs/accelerate/fsdp2.yaml)."
        )
    if fsdp is not None and model is not None and "SIZE" in fsdp["auto_wrap_policy"]:
        threshold = fsdp["min_num_params"]
        too_big = [name for name, numel in _lora_matrices(model) if threshold is not None and numel > threshold]
        if too_big:
            raise ValueError(
                f"FSDP2 with auto_wrap_policy SIZE_BASED_WRAP and min_num_params={threshold} would make LoRA matrices "
                f"({too_big[0]}, ... {len(too_big)} in all) their own FSDP groups, which stay sharded while ALLoRA's "
                "layer reads them. Fix: use `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` (one group per decoder "
                "layer), or raise `fsdp_min_num_params` above the largest LoRA matrix."
            )
    if accelerator is not None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world_size > 1 and accelerator.num_processes == 1:
            raise ValueError(
                f"{world_size} processes were launched (WORLD_SIZE={world_size}) but accelerate sees one, so each "
                "process would train alone on its own data instead of as one data-parallel job. On a machine without "
                "GPUs set `use_cpu: true` (training argument `--use_cpu true`) so accelerate forms a multi-CPU (gloo) "
                "group; with GPUs, check that torch sees them (`python -c 'import torch; print(torch.cuda.device_count())'`)."
            )
