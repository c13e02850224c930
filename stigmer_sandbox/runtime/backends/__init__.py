"""The platforms that run sandboxes: `base` is the seam (what the runtime asks of one),
`docker` the Docker Engine implementation."""
