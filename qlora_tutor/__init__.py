"""QLoRA Tutor: 4-bit quantized low-rank fine-tuning, built from scratch and checked against the real stack."""

__version__ = "0.1.0"
