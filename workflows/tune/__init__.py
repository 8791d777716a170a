"""Ray Tune sweeps over a training stage (`medplib sweep`)."""
