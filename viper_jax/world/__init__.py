"""`viper world`: ShapeWorld's benchmark, the base model's training data and its tokenizer (the world itself,
NumPy + PIL only, is viper_common.shapeworld)."""
