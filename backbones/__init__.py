"""Backbone families, one module each, registered in :data:`benchbench.backbone.BACKBONES`.

Each module holds a family's chat prompt, its real loader (a :class:`~benchbench.backbone.BackboneSpec`
with a ``hub_id``) and its tiny builder (the same transformers class from a tiny config, random init,
for tests and CPU runs); :mod:`.tiny` is what the tiny builders share (word-level tokenizer, text
config, feature extractor). Adding a backbone: one module here (or in a plugin registering a
``BackboneSpec`` under the entry-point group ``benchbench.backbones``), see CONTRIBUTING.md.
"""
