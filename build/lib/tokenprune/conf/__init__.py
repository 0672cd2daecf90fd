"""Hydra configuration tree (a package so installed entry points find it)."""
