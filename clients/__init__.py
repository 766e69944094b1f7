"""astguard.clients: the user client and the model-stealing attacker (issue 4)."""
