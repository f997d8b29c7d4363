"""Pipeline steps. Each module exposes `run(params) -> outputs` and a CLI:
`python -m components.<step> [--params params.yaml] [--set section.key=value ...]`."""
