"""Preference alignment of diffusion and flow-matching image and video generators."""
