"""The toy teacher zoo: tiny SD-shaped teachers built offline from a seed."""
