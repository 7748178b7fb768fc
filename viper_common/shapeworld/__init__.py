"""ShapeWorld: a procedural world in which a small VLM's perception can be measured (NumPy + PIL only).

Modules: `scene` (the typed scene and its JSON), `render` (scene + seed -> PNG with the scene in its
metadata), `language` (captions from scenes, and a tolerant parser back), `edits` (edit operations <->
instruction text), `questions` and `bench` (the held-out benchmark), `base_data` (the base model's
general-skill training data).
"""
