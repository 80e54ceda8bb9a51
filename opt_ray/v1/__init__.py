"""Generated gRPC stubs for the ``opt_ray.v1`` proto package (``make proto``); do not edit."""
