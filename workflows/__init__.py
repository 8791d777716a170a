"""Distributed jobs on Ray (data preprocessing, training stages, sweeps, evaluation), MLflow, and the CLI."""
