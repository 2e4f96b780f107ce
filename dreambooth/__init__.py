"""DreamBooth trainer core: runs with or without the AUTOMATIC1111 WebUI.

Every import inside this package is relative, so the package works under any
module name. Inside the WebUI it is loaded under a private alias (see
``scripts/dreambooth_tab.py``) and never collides with another extension that
also ships a top-level ``dreambooth`` package.
"""

__version__ = "0.1.0"
