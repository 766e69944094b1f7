"""training: data -> teacher (every recipe in training.teachers) -> verified ONNX export and model card."""
