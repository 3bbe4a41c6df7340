"""Encrypted datasets: the signed manifest that binds a dataset's files, and the encrypted file formats."""
