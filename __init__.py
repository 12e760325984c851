"""diffusion-explain as a ComfyUI custom node pack.

Clone or copy this repository into ``ComfyUI/custom_nodes/``; ComfyUI imports this file and
reads ``NODE_CLASS_MAPPINGS``. The nodes live in ``nodes/`` and the science in ``explain/``,
which the nodes import as a top-level package, so this folder is put on ``sys.path`` (at the
end, so it never shadows anything ComfyUI or another pack imports).
"""

import logging
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

import explain as _explain  # noqa: E402

if os.path.dirname(os.path.realpath(_explain.__file__)) != os.path.join(_HERE, "explain"):
    logging.getLogger("diffusion-explain").warning(
        "diffusion-explain: the nodes use the 'explain' package at %s, not the one in %s; if the nodes fail, "
        "uninstall that package (pip uninstall diffusion-explain) and restart ComfyUI",
        _explain.__file__,
        _HERE,
    )

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:
    # Imported as a plain module, not as the pack: pytest does so in a clone whose folder name is no
    # Python identifier (`git clone …/diffusion-explain`), where `.nodes` cannot resolve.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
