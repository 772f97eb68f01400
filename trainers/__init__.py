"""Training workloads: plain Ray jobs (`python -m trainers.<name>`).

Nothing here imports `ray_apps`; the platform imports `trainers.specs` and
`trainers.pricing`, which stay free of heavy imports.
"""
