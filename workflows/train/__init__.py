"""A training stage on Ray Train (`stage.py`), the stage and pipeline configs (`config.py`), and the sample
predictions each stage logs (`samples.py`)."""
