"""The vault: the process inside the CVM that holds dataset keys and plaintext, and talks to owners' brokers."""
