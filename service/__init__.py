"""service: serves defended probabilities from an ONNX teacher over HTTP; no torch."""
