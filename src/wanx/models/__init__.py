"""The separately trained Wan2.1 networks."""
