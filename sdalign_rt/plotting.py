"""matplotlib where it is installed (the demo and dev extras): result files always get their JSON, and a PNG
beside it only when matplotlib can draw one."""
from __future__ import annotations

import warnings


def pyplot(png_path: str):
    """matplotlib.pyplot on the Agg backend, or None (with a warning naming the PNG left out) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(f"matplotlib is not installed, so {png_path} is not drawn (pip install matplotlib, or the "
                      "package's demo extra)", stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
