"""aurecog: a PyTorch Lightning benchmark suite for facial action unit detection and expression recognition."""

import os

# albumentations 2.0.8 checks PyPI for updates on import; this suite never touches the network on its own.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
