"""astguard.service: serves defended probabilities from an ONNX teacher over HTTP (issue 3)."""
