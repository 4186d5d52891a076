"""Preference alignment of LLaVA-style vision-language models."""
