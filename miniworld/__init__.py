"""A miniature world the project owns end to end: procedural subjects (persons and dogs) with discrete
identities, scenes described by plain-English captions, and small metric models that score generated
images for identity and prompt fidelity. Pure torch/numpy/PIL; nothing here imports the host.

- `miniworld.world`: identities, scenes, captions, rendering, training triplets (`python -m miniworld.world`)
- `miniworld.metrics`: `WorldMetrics`, the shipped identity and prompt metrics
- `miniworld.train_metrics`: retrains the metric models (`python -m miniworld.train_metrics`)
"""
