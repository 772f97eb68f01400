"""Ray Serve apps (FastAPI ingress), deployed from `configs/serve.yaml`."""
