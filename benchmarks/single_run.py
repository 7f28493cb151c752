"""One benchmark run: load the model, train one method with one optimizer / LR / seed, evaluate; the result as a dict.

A run is identified by everything that determines its result (:class:`RunSpec`): its run id names the method,
optimizer, LR, seed and steps for a reader and ends in a digest of the whole spec, so two different specs never share
a file. Runs with the same seed see the same training examples in the same order (paired). Writing and reading the
run files is :mod:`benchmarks.record`'s job.

The device is not part of a run's identity (the same run on a GPU is the same experiment, up to numerics); it is
recorded in the run's JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger("benchmarks")


def _digest(spec) -> str:
    """Eight hex digits of the spec's canonical JSON: part of its run id."""
    return hashlib.sha1(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int
    steps: int
    split: str  # "select" (LR selection questions) or "report" (reported questions)
    tasks: tuple[str, ...]
    eval_limit: int | None
    batch_size: int
    max_length: int
    optim: str  # "adamw" (adamw_torch) or "sgd" (momentum 0.9)
    warmup_steps: int
    max_grad_norm: float  # 0: no clipping
    model: str | None  # a local causal-LM folder; None = SmolLM2-135M-Instruct
    dtype: str  # "float32" or "bfloat16" (bf16 weights and autocast)
    loss_limit: int  # held-out answer-loss examples per task (0 = not measured)
    loss_max_length: int
    sampling: str  # "random" or "group_by_length"

    @property
    def run_id(self) -> str:
        return (
            f"{self.split}__{self.method}__{self.optim}__lr{self.lr:.3g}__s{self.seed}__n{self.steps}__{_digest(self)}"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}


@dataclass(frozen=True)
class BaseEvalSpec:
    """The model before fine-tuning, on the reported questions (a reference row)."""

    split: str
    tasks: tuple[str, ...]
    eval_limit: int | None
    model: str | None
    dtype: str
    loss_limit: int
    loss_max_length: int

    @property
    def run_id(self) -> str:
        return f"{self.split}__base__{_digest(self)}"

    def to_json(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out


def _norm_recorder():
    from transformers import TrainerCallback

    from allora_trl.core.gradient import lora_row_norms
    from allora_trl.core.model import iter_lora_layers

    class NormRecorder(TrainerCallback):
        """Per optimizer step: row norms of the adapter's weight change (scaling * BA) and of BA; step time.

        ALLoRA's coefficient is a function of the row norms of BA, so their mean and largest value say how far it
        can have moved. For DoRA the recorded change is scaling * BA (its magnitude vector is not included).
        """

        def __init__(self):
            self.rows: list[dict] = []
            self._t0 = None

        def _record(self, step, model):
            import torch

            total = raw = 0.0
            largest = 0.0
            count = 0
            with torch.no_grad():
                for _, layer in iter_lora_layers(model):
                    for name in layer.active_adapters:
                        if name not in layer.lora_A:
                            continue
                        norms = lora_row_norms(layer.lora_A[name].weight, layer.lora_B[name].weight).float()
                        raw += float(norms.sum())
                        total += float(norms.sum()) * float(layer.scaling[name])
                        largest = max(largest, float(norms.max()))
                        count += norms.numel()
            self.rows.append(
                {
                    "step": step,
                    "delta_row_norm_mean": total / max(count, 1),
                    "ba_row_norm_mean": raw / max(count, 1),
                    "ba_row_norm_max": largest,
                }
            )

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(0, model)

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seconds = time.perf_counter() - self._t0 if self._t0 else float("nan")
            self._record(state.global_step, model)
            self.rows[-1]["step_s"] = seconds

    return NormRecorder()


def resolve_device(device: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"``; ``"auto"`` takes the GPU when there is one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no GPU")
    return device


def load_model(model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer, path)``: a local causal-LM folder (default SmolLM2-135M-Instruct) in ``dtype`` on ``device``.

    A tokenizer without a padding token gets its EOS token as one (batched scoring and training need one).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        from allora_trl.job.assets import smollm2_path

        path = smollm2_path()
    else:
        path = str(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    return loaded, tokenizer, path


def _evaluate_all(model, tokenizer, spec, eval_batch_size: int) -> dict:
    """Accuracy on the spec's questions and, with ``loss_limit``, the held-out answer loss of its split."""
    from .data import answer_loss, evaluate

    results = evaluate(model, tokenizer, spec.tasks, spec.split, spec.eval_limit, eval_batch_size)
    data = {"eval": results, "avg_acc": statistics.fmean(r["acc"] for r in results.values())}
    if spec.loss_limit:
        data["answer_loss"] = answer_loss(
            model, tokenizer, spec.tasks, spec.split, spec.loss_limit, max_length=spec.loss_max_length
        )
    return data


def run_base_eval(spec: BaseEvalSpec, eval_batch_size: int, device: str = "cpu") -> dict:
    started = time.time()
    model, tokenizer, _ = load_model(spec.model, spec.dtype, device)
    data = {
        "spec": spec.to_json(),
        "run_id": spec.run_id,
        **_evaluate_all(model, tokenizer, spec, eval_batch_size),
        "wall_s": time.time() - started,
        "versions": versions(),
    }
    if device != "cpu":
        data["device"] = device
    return data


def run_one(spec: RunSpec, eval_batch_size: int = 32, device: str = "cpu") -> dict:
    """Train and evaluate one run; returns the JSON-ready result (nothing is written here)."""
    import torch
    from transformers import set_seed

    from .data import train_dataset
    from .methods import get_method

    started = time.time()
    method = get_method(spec.method)
    set_seed(spec.seed)
    model, tokenizer, _ = load_model(spec.model, spec.dtype, device)
    dataset = train_dataset(spec.tasks, spec.steps * spec.batch_size, spec.seed, tokenizer, spec.max_length)
    recorder = _norm_recorder()
    with tempfile.TemporaryDirectory(prefix="allora-bench-run-") as tmp:
        args_kwargs = dict(
            output_dir=tmp,
            max_steps=spec.steps,
            per_device_train_batch_size=spec.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=spec.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=spec.warmup_steps,
            weight_decay=0.0,
            max_grad_norm=spec.max_grad_norm,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            max_length=spec.max_length,
            seed=spec.seed,
            dataloader_num_workers=0,
            bf16=spec.dtype == "bfloat16",
            gradient_checkpointing=False,  # TRL's default; on a CPU it costs far more than the memory it saves
            use_cpu=device == "cpu",
            disable_tqdm=True,
        )
        if spec.sampling != "random":
            args_kwargs["train_sampling_strategy"] = spec.sampling
        if spec.optim == "sgd":
            args_kwargs.update(optim="sgd", optim_args="momentum=0.9")
        elif spec.optim != "adamw":
            raise ValueError(f"optim must be 'adamw' or 'sgd', got {spec.optim!r}")
        trainer = build_trainer_for(method, model, tokenizer, dataset, args_kwargs, recorder)
        output = trainer.train()
    history = trainer.state.log_history
    steps = [r for r in history if "loss" in r and "step" in r]
    losses = [float(r["loss"]) for r in steps]
    coefficient = [
        {"step": r["step"], **{k.split("/", 1)[1]: float(r[k]) for k in r if k.startswith("allora/")}}
        for r in history
        if "allora/coefficient_mean" in r
    ]
    grad_norms = [float(r["grad_norm"]) for r in steps if "grad_norm" in r]
    step_times = [r["step_s"] for r in recorder.rows[1:] if "step_s" in r]
    diverged = not all(math.isfinite(x) for x in losses)
    evaluated = _evaluate_all(trainer.model, tokenizer, spec, eval_batch_size)
    tail = [x for x in losses[-max(1, len(losses) // 5) :] if math.isfinite(x)]
    data = {
        "run_id": spec.run_id,
        "spec": spec.to_json(),
        "method": method.describe(),
        "train": {
            "loss": losses,
            "loss_steps": [r["step"] for r in steps],
            "final_loss": statistics.fmean(tail) if tail else float("nan"),
            "grad_norm": grad_norms,
            # steps whose gradient norm exceeds the clipping norm (1.0 for unclipped runs: "would have been")
            "clipped_fraction": (
                sum(g > (spec.max_grad_norm or 1.0) for g in grad_norms) / len(grad_norms) if grad_norms else 0.0
            ),
            "coefficient": coefficient,
            "row_norms": recorder.rows,
            "step_time_median_s": statistics.median(step_times) if step_times else float("nan"),
            "train_runtime_s": output.metrics.get("train_runtime"),
            "diverged": diverged,
            "examples": len(dataset),
        },
        **evaluated,
        "wall_s": time.time() - started,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    if device != "cpu":
        data["device"] = device
    del trainer, model
    return data


def build_trainer_for(method, model, tokenizer, dataset, args_kwargs, recorder):
    from .methods import build_trainer

    return build_trainer(method, model, tokenizer, dataset, args_kwargs, callbacks=[recorder])
