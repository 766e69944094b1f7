"""One module per resource: predict (the astguard API), v2 (Open Inference Protocol), info (model, metrics)."""
