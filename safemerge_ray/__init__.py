"""safemerge-ray: SafeMERGE repair of LoRA fine-tunes, for one adapter or a whole fleet."""

__version__ = "0.1.0"
