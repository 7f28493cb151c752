"""The methods compared, each built with peft / TRL as a user would, at the same rank, targets and budget.

Every method trains rank-16 adapters on all linear layers of the model. What differs is the LoRA configuration,
the trainer and the optimiser; each method has its own learning-rate grid centred on its usual value (four points
spanning 8x, all searched in full mode; the chosen LR is picked on the selection split).
"""

from __future__ import annotations

from dataclasses import dataclass

RANK = 16
TARGETS = "all-linear"
ADAMW_GRID = (1e-4, 2e-4, 4e-4, 8e-4)
LOW_GRID = (5e-5, 1e-4, 2e-4, 4e-4)  # methods whose effective step is larger at the same LR
RSLORA_GRID = (2.5e-5, 5e-5, 1e-4, 2e-4)  # alpha = 2r with rsLoRA is 4x LoRA's scaling at r = 16


@dataclass(frozen=True)
class Method:
    """One benchmarked method. ``alpha_factor``: lora_alpha = factor * r."""

    name: str
    summary: str
    alpha_factor: float
    dropout: float
    trainer: str = "sft"  # "sft" (TRL SFTTrainer) or "allora" (ALLoRATrainer)
    eta: float | None = None
    coefficient: str = "weight"
    scale: str = "gradient"  # "update": allora-trl's extension (allora_trl.core.update_scaling)
    use_dora: bool = False
    use_rslora: bool = False
    loraplus_ratio: float | None = None
    lr_grid: tuple[float, ...] = ADAMW_GRID
    default_lr: float = 2e-4
    note: str = ""  # what a reader of the report needs to know beyond ``summary`` (printed when the method ran)

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=RANK,
            lora_alpha=int(round(self.alpha_factor * RANK)),
            lora_dropout=self.dropout,
            target_modules=TARGETS,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "lora_alpha": int(round(self.alpha_factor * RANK)),
            "r": RANK,
            "lora_dropout": self.dropout,
            "trainer": "ALLoRATrainer" if self.trainer == "allora" else "SFTTrainer",
            "eta": self.eta,
            "coefficient": self.coefficient if self.trainer == "allora" else None,
            "scale": self.scale if self.trainer == "allora" else None,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "loraplus_ratio": self.loraplus_ratio,
            "lr_grid": list(self.lr_grid),
        }


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LoRA, the paper's baseline (alpha=2r, dropout 0.05)", 2.0, 0.05),
        Method("allora0", "LoRA with ALLoRA's setting and no coefficient (alpha=r, dropout 0)", 1.0, 0.0),
        Method("allora_eta1", "ALLoRA, eta=1", 1.0, 0.0, "allora", eta=1.0),
        Method("allora_eta_sqrt2", "ALLoRA, eta=sqrt 2", 1.0, 0.0, "allora", eta=2.0**0.5),
        Method("allora", "ALLoRA, eta=2 (the paper's default)", 1.0, 0.0, "allora", eta=2.0),
        Method(
            "allora_output",
            "ALLoRA, per-token output coefficient (eta=2; the paper's ablation)",
            1.0,
            0.0,
            "allora",
            eta=2.0,
            coefficient="output",
        ),
        Method(
            "allora_update",
            "ALLoRA, coefficient on the optimiser update (eta=2; allora-trl's extension)",
            1.0,
            0.0,
            "allora",
            eta=2.0,
            scale="update",
            lr_grid=LOW_GRID,
            default_lr=1e-4,
            note="allora-trl's own extension, not the paper's: B's update row i is multiplied by c_i, A's by mean(c) "
            "(`allora_trl/core/update_scaling.py`); at B = 0 its step under Adam is eta x lr, so its grid is shifted "
            "down 2x.",
        ),
        Method(
            "loraplus",
            "LoRA+ (peft create_loraplus_optimizer, lr_B = 16 lr_A; alpha=2r, dropout 0.05)",
            2.0,
            0.05,
            loraplus_ratio=16.0,
            lr_grid=LOW_GRID,
            default_lr=1e-4,
            note="LoRA's config (alpha = 2r, dropout 0.05) with peft's `create_loraplus_optimizer` (lr of B = 16 x lr "
            "of A) passed to `SFTTrainer(optimizers=(opt, None))`.",
        ),
        Method("dora", "DoRA (peft use_dora; alpha=2r, dropout 0.05)", 2.0, 0.05, use_dora=True),
        Method(
            "rslora",
            "rsLoRA (peft use_rslora; alpha=2r, so scaling alpha/sqrt(r)=8)",
            2.0,
            0.05,
            use_rslora=True,
            lr_grid=RSLORA_GRID,
            default_lr=5e-5,
            note="keeps LoRA's alpha = 2r and sets `use_rslora=True`, so its scaling is alpha/sqrt(r) = 8, four times "
            "LoRA's 2 at r = 16; its LR grid is shifted down 4x.",
        ),
    )
}

# The pair the optimiser study compares: the paper's default ALLoRA and the same adapter without the coefficient.
OPTIM_PAIR = ("allora", "allora0")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}: choose from {', '.join(METHODS)}.")
    return METHODS[name]


def build_trainer(method: Method, model, tokenizer, dataset, args_kwargs: dict, callbacks=()):
    """The TRL trainer of ``method`` for a freshly loaded base ``model`` (the trainer builds the peft model)."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from allora_trl import ALLoRAConfig, ALLoRATrainer

    common = dict(model=model, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks))
    if method.trainer == "allora":
        args = ALLoRAConfig(
            **args_kwargs, allora_eta=method.eta, allora_coefficient=method.coefficient, allora_scale=method.scale
        )
        trainer = ALLoRATrainer(args=args, peft_config=method.lora_config(), **common)
    elif method.loraplus_ratio:
        import torch
        from peft import get_peft_model
        from peft.optimizers import create_loraplus_optimizer

        peft_model = get_peft_model(model, method.lora_config())
        optimizer = create_loraplus_optimizer(
            model=peft_model,
            optimizer_cls=torch.optim.AdamW,
            lr=args_kwargs["learning_rate"],
            loraplus_lr_ratio=method.loraplus_ratio,
            weight_decay=args_kwargs.get("weight_decay", 0.0),
        )
        common["model"] = peft_model
        trainer = SFTTrainer(args=SFTConfig(**args_kwargs), optimizers=(optimizer, None), **common)
    else:
        trainer = SFTTrainer(args=SFTConfig(**args_kwargs), peft_config=method.lora_config(), **common)
    trainer.remove_callback(PrinterCallback)  # a log line per step is for the JSON, not the console
    return trainer
