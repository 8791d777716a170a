"""MeCoVQA data contract: row schema, parsing, validation, image I/O, tokenisation and collation (no Ray)."""
