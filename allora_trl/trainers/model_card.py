"""The model card saved beside an ALLoRA adapter: TRL's card, naming ALLoRA, its settings and its paper.

peft writes an empty template card (README.md) with every ``save_pretrained``; TRL's trainers replace it with a card
that names the method and cites its paper. The ALLoRA trainers write TRL's card with the method named
"ALLoRA (<parent>)", the tag ``allora`` beside the parent's tags, ALLoRA's paper (arXiv 2410.09692) cited beside
the parent's own paper and TRL, and a section giving the ALLoRA settings of the run.
"""

from __future__ import annotations

import os

ALLORA_TAG = "allora"
ALLORA_PAPER = {
    "title": "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
    "id": "2410.09692",
    "citation": """@article{huang2024allora,
    title        = {{ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws}},
    author       = {Hai Huang and Randall Balestriero},
    year         = 2024,
    eprint       = {arXiv:2410.09692}
}""",
}


def settings_section(args, adapters: list[str]) -> str:
    """Markdown naming the ALLoRA settings that shaped the adapter, and how to load or continue it."""
    return (
        "## ALLoRA\n\n"
        "The adapter is plain LoRA (`lora_alpha == r`, no dropout): `peft.PeftModel.from_pretrained` loads it and "
        "`merge_and_unload` merges it. Its A and B were trained with the ALLoRA rule "
        "([arXiv 2410.09692](https://arxiv.org/abs/2410.09692)); `allora_config.json` beside it records the settings "
        "below, and `allora_trl.load_allora_adapter` restores them to continue training.\n\n"
        f"- eta: {args.allora_eta}\n"
        f"- coefficient: {args.allora_coefficient}\n"
        f"- scale: {args.allora_scale}\n"
        f"- adapters trained with ALLoRA: {', '.join(adapters)}\n\n"
    )


def write_model_card(trainer, folder: str, model_name=None, dataset_name=None, tags=None) -> str:
    """Write ``README.md`` into ``folder`` for an ALLoRA trainer (built with TRL's ``generate_model_card``)."""
    from trl.trainer.utils import generate_model_card, get_config_model_id

    model_name_or_path = get_config_model_id(trainer.model.config)
    base_model = model_name_or_path if model_name_or_path and not os.path.isdir(model_name_or_path) else None
    tags = {tags} if isinstance(tags, str) else set(tags or ())
    tags.update(trainer._tag_names)
    parent_paper = trainer._parent_paper
    citation = "\n\n".join(c for c in (ALLORA_PAPER["citation"], parent_paper.get("citation")) if c)
    card = generate_model_card(
        base_model=base_model,
        model_name=model_name or os.path.basename(os.path.normpath(folder)),
        hub_model_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
        dataset_name=dataset_name,
        tags=sorted(tags),
        wandb_url=None,
        trackio_url=None,
        trainer_name=trainer._name,
        trainer_citation=citation,
        paper_title=ALLORA_PAPER["title"],
        paper_id=ALLORA_PAPER["id"],
    )
    section = settings_section(trainer.args, getattr(trainer, "allora_adapters", []))
    text = card.text
    card.text = text.replace("## Citations", section + "## Citations", 1) if "## Citations" in text else text + section
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path
