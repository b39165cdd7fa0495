"""Names shared by the server tests and their fixtures."""

API_KEY = "test-key"
ADAPTERS = ["alpha", "beta", "gamma"]
BASE = "tiny"  # the base model's id: the name of its folder
