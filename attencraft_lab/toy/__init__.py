"""A small world the method can be measured in: procedural scenes with exact masks (`world`), a
deterministic judge (`judge`), and an SD-shaped text-to-image model of that world (`model`, `train`)."""
