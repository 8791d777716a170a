"""MedPLIB serving: the Ray Serve application (`serve.app`), its HTTP API (`serve.api`, `serve.schemas`), the
model-side logic without Ray (`serve.service`), masks on the wire (`serve.masks`), settings (`serve.config`) and a
client (`serve.client`). Importing this package imports nothing heavy; only `serve.app` needs Ray."""
