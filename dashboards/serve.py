"""Start Streamlit for the dashboard with its imports and site already loaded.

``twin dashboard`` runs ``python -m dashboards.serve run dashboards/app.py …`` instead of
``python -m streamlit run …``: the same Streamlit command line, but before the server starts
this process imports what the app needs (pandas, Altair, pyarrow, the panels) and reads the
site's documents (``FLUX_SITE``), so the first visitor after a start does not wait for them
(Streamlit imports a script's modules only when the first session runs it).
"""

from __future__ import annotations

import os
import sys


def preload() -> None:
    import altair  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    import dashboards.live
    import dashboards.panels  # noqa: F401
    from dashboards import core

    core.preload_docs(os.environ.get("FLUX_SITE"))


def main() -> None:
    if os.environ.get("FLUX_PRELOAD", "1") != "0":  # 0: off (the benchmark compares)
        preload()
    from streamlit.web import cli

    sys.argv = ["streamlit", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
