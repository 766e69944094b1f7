"""astguard.training: data -> teacher (base, AST, NT, STT) -> verified ONNX export."""
