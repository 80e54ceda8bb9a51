"""opt-ray: the OPT recipe (dedup, tokenize, train, serve) as an elastic service on Ray."""

__version__ = "0.1.0"
