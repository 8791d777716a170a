"""MedPLIB serving: the Ray Serve application (`serve.app`), its HTTP API (`serve.api`, `serve.schemas`), the
model-side logic without Ray (`serve.service`) and settings (`serve.config`); masks on the wire and the client are
`medplib_client`. Importing this package imports nothing heavy; only `serve.app` needs Ray."""
