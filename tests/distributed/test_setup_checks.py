"""Start-up checks (allora_trl.core.distributed) and the shipped accelerate configs, without launching anything.

The configs are read by accelerate's own ``accelerate launch`` argument handling, which produces the environment a
launched process would see; ``check_distributed_setup`` must accept every shipped config and reject FSDP1.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from dist_common import build_model

from allora_trl.core.distributed import check_distributed_setup

CONFIG_DIR = Path(__file__).resolve().parents[2] / "example_configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def launch_env(config_file: Path) -> tuple[SimpleNamespace, dict]:
    """The parsed launch arguments and, for non-DeepSpeed configs, the env ``accelerate launch`` gives each process."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args, ({} if args.use_deepspeed else prepare_multi_gpu_env(args))


def test_the_expected_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"fsdp2.yaml", "ddp.yaml", "fsdp2-multinode.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"} <= names


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid_documented_and_accepted(config_file, clean_env):
    text = config_file.read_text()
    assert text.startswith("# ") and "Use it" in text.split("compute_environment")[0]  # says when to use it
    raw = yaml.safe_load(text)
    args, env = launch_env(config_file)
    for key, value in env.items():
        clean_env.setenv(key, value)
    if raw["distributed_type"] == "FSDP":
        assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    elif raw["distributed_type"] == "DEEPSPEED":
        assert args.use_deepspeed and raw["deepspeed_config"]["zero_stage"] in (2, 3)
    else:
        assert raw["distributed_type"] == "MULTI_GPU" and args.multi_gpu
    if raw["num_machines"] > 1:
        assert args.main_process_ip and args.main_process_port and args.num_processes > raw["num_machines"]
    check_distributed_setup(SimpleNamespace(fsdp_plugin_args=None))


def test_fsdp1_from_an_accelerate_config_without_fsdp_version_is_rejected(tmp_path, clean_env):
    raw = yaml.safe_load((CONFIG_DIR / "fsdp2.yaml").read_text())
    del raw["fsdp_config"]["fsdp_version"]  # accelerate then uses FSDP1
    config_file = tmp_path / "fsdp-no-version.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    _, env = launch_env(config_file)
    assert env["FSDP_VERSION"] == "1"
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(ValueError, match=r"FSDP1.*fsdp_version: 2"):
        check_distributed_setup(SimpleNamespace(fsdp_plugin_args=None))


def test_fsdp1_from_training_arguments_or_accelerator_is_rejected(clean_env):
    from allora_trl import ALLoRAConfig

    args = ALLoRAConfig(output_dir="unused", fsdp=True, fsdp_config={"version": 1}, report_to="none")
    with pytest.raises(ValueError, match="FSDP1"):
        check_distributed_setup(args)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=1)), num_processes=2
    )
    with pytest.raises(ValueError, match="FSDP1"):
        check_distributed_setup(None, accelerator)
    # FSDP2 (transformers' default version) and no FSDP at all are accepted
    check_distributed_setup(ALLoRAConfig(output_dir="unused", fsdp=True, report_to="none"))
    check_distributed_setup(ALLoRAConfig(output_dir="unused", report_to="none"))


def test_fsdp2_size_based_wrap_that_would_shard_lora_matrices_alone_is_rejected(clean_env):
    model = build_model()  # LoRA matrices of 4 x 64 = 256 and 128 x 4 = 512 elements

    def accelerator(min_num_params):
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="SIZE_BASED_WRAP",
            min_num_params=min_num_params,
            state_dict_type="FULL_STATE_DICT",  # accelerate's FSDP2 default (sharded) is rejected on its own
        )
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), num_processes=2)

    with pytest.raises(ValueError, match="TRANSFORMER_BASED_WRAP"):
        check_distributed_setup(None, accelerator(100), model)
    check_distributed_setup(None, accelerator(10_000), model)  # no LoRA matrix is that large: each stays in its layer


def test_processes_that_do_not_form_one_group_are_rejected(clean_env):
    single = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), num_processes=1)
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="use_cpu"):
        check_distributed_setup(None, single)
    check_distributed_setup(None, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), num_processes=2))
    clean_env.setenv("WORLD_SIZE", "1")
    check_distributed_setup(None, single)


def test_fsdp_sharded_state_dict_is_rejected_naming_the_fix(clean_env):
    """transformers writes no final adapter under SHARDED_STATE_DICT: fail before training, not after it."""
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "2")
    clean_env.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    with pytest.raises(ValueError, match="fsdp_state_dict_type: FULL_STATE_DICT"):
        check_distributed_setup(args=SimpleNamespace(fsdp_plugin_args=None))
    clean_env.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    check_distributed_setup(args=SimpleNamespace(fsdp_plugin_args=None))


@pytest.mark.parametrize("launch_env_var", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_update_scaling_is_refused_with_sharded_optimizers(clean_env, launch_env_var):
    clean_env.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    clean_env.setenv(launch_env_var, "true")
    clean_env.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="allora_scale='update'"):
        check_distributed_setup(SimpleNamespace(allora_scale="update"))
    check_distributed_setup(SimpleNamespace(allora_scale="gradient"))  # the paper's rule is fine there
