"""Plinth's node library: ComfyUI-compatible nodes, each declaring its schema once."""
