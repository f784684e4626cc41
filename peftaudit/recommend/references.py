"""The papers and documents the recommendation rules rest on, cited by key in every reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """A citable source: who, what, where."""

    key: str
    title: str
    url: str


REFERENCES: dict[str, Reference] = {
    r.key: r
    for r in (
        Reference(
            "lora",
            "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (section 7.1, table 6)",
            "https://arxiv.org/abs/2106.09685",
        ),
        Reference(
            "qlora",
            "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (section 4, appendix B.2)",
            "https://arxiv.org/abs/2305.14314",
        ),
        Reference(
            "lllf",
            "Biderman et al. 2024, LoRA Learns Less and Forgets Less (continued pre-training, rank 16 to 256)",
            "https://arxiv.org/abs/2405.09673",
        ),
        Reference(
            "rslora",
            "Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
            "https://arxiv.org/abs/2312.03732",
        ),
        Reference(
            "lwr",
            "Schulman and Thinking Machines Lab 2025, LoRA Without Regret (capacity, RL, MoE ranks)",
            "https://thinkingmachines.ai/blog/lora/",
        ),
        Reference(
            "peft",
            "peft 0.21 LoraConfig and ParamWrapper (target_parameters; lora_dropout must be 0 there)",
            "https://huggingface.co/docs/peft/package_reference/lora",
        ),
        Reference(
            "llava",
            "Liu et al. 2023, Improved Baselines with Visual Instruction Tuning (LLaVA-1.5): vision encoder frozen, "
            "projector and language model trained; LoRA recipe scripts/v1_5/finetune_lora.sh (mm_projector_lr)",
            "https://github.com/haotian-liu/LLaVA",
        ),
        Reference(
            "llamafactory-mm",
            "LLaMA-Factory FinetuningArguments: freeze_vision_tower=True, freeze_multi_modal_projector=True, "
            "freeze_language_model=False by default",
            "https://github.com/hiyouga/LLaMA-Factory/blob/main/src/llamafactory/hparams/finetuning_args.py",
        ),
        Reference(
            "peft-vit",
            "peft image classification with LoRA (ViT): target_modules query and value, the classifier in "
            "modules_to_save; LoraConfig also wraps nn.Conv2d named in target_modules",
            "https://huggingface.co/docs/peft/task_guides/image_classification_lora",
        ),
        Reference(
            "defaults",
            "LLaMA-Factory (lora_alpha defaults to lora_rank * 2) and TRL ModelConfig (lora_r 16, lora_alpha 32)",
            "https://github.com/hiyouga/LLaMA-Factory/blob/main/src/llamafactory/hparams/finetuning_args.py",
        ),
    )
}
