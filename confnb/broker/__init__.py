"""The data owner's key broker: dataset keys released only to attested kernels, every decision audited."""
