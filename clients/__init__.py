"""clients: the user client (client.py) and the model-stealing attacker (steal.py, attack/)."""
