"""Hydra configs of the recipe; a package so distill configs can find model/ and base through pkg://hydra_config.

Nothing to import here.
"""
