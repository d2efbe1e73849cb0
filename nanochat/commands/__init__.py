"""Thin CLI front-ends: each module parses flags and calls library code (see ``nanochat.cli``)."""
