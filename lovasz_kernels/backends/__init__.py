"""One module per backend, each implementing ``lovasz_extension(errors, fg)``.

See ``lovasz_kernels/_registry.py`` for the contract and how a backend is registered.
"""
