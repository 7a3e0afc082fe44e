"""Data: label sources, the one image preprocessing path, datasets and synthetic images."""
