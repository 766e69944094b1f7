"""astguard: what training and the service share (the model card, the registry idiom, the CLI helper); stdlib only."""
