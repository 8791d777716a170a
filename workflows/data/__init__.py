"""Ray Data preprocessing (`medplib data prepare`) and the readers of its output."""
