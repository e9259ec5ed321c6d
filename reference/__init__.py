"""Test-only oracles (not installed): naive transcriptions of the paper's definitions."""
