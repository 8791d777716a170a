"""MedPLIB: a biomedical multimodal LLM with pixel-level grounding (model, data contract, losses, metrics).

This package is pure PyTorch + transformers + peft; it never imports Ray. The distributed jobs live in
`workflows/`, the HTTP service in `serve/`.
"""

__version__ = "0.1.0"
