"""diffusion-explain as a ComfyUI custom node pack.

Clone or copy this repository into ``ComfyUI/custom_nodes/``; ComfyUI imports this file and
calls ``comfy_entrypoint`` (its V3 node API). The nodes live in ``nodes/`` and the science in
``explain/``, which the nodes import as a top-level package, so this folder is put on
``sys.path`` (at the end, so it never shadows anything ComfyUI or another pack imports).

At load the pack checks its environment and says, in one line each, what is missing: Python
packages from ``requirements.txt`` (with the command that installs them) or a ComfyUI too old to
host it (then no nodes are registered).
"""

import logging
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)
if not __package__:
    # Imported as a plain module, not as the pack: pytest does so in a clone whose folder name is no
    # Python identifier (`git clone …/diffusion-explain`). Be the package ComfyUI imports, so that
    # the relative imports below resolve.
    __path__ = [_HERE]
    __package__ = __name__

from .nodes import environment as _environment  # noqa: E402 - standard library only

_log = logging.getLogger("diffusion-explain")
_missing = _environment.missing_requirements()
if _missing:
    _log.warning(_environment.load_message(_missing))

import explain as _explain  # noqa: E402

if os.path.dirname(os.path.realpath(_explain.__file__)) != os.path.join(_HERE, "explain"):
    _log.warning(
        "diffusion-explain: the nodes use the 'explain' package at %s, not the one in %s; if the nodes fail, "
        "uninstall that package (pip uninstall diffusion-explain) and restart ComfyUI",
        _explain.__file__,
        _HERE,
    )

_unsupported = _environment.unsupported_comfyui()
if _unsupported:
    # ComfyUI registers packs by NODE_CLASS_MAPPINGS (V1) before comfy_entrypoint (V3): an empty
    # mapping loads the pack with no nodes, after this line has said why (outside ComfyUI: quietly).
    if _environment.inside_comfyui():
        _log.warning(_unsupported)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
else:
    from .nodes.pack import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint"]
