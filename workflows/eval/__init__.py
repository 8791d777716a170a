"""Batch evaluation (`medplib eval`): its config, the evaluator on a Ray Data actor pool, the HTML report."""
