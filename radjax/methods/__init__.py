"""Pre-training and fine-tuning methods: one file each, wiring models to losses.

``get_method(name)`` returns a :class:`radjax.methods.base.Method`; the training
loop is shared. Names: none, supervised, ssl, clip, siglip, mrm, clip_ssl, caption, unicl.
Fine-tuning on frozen features (``linear``, ``distill``) lives in ``distill.py``.
"""

from radjax.methods import caption, clip, clip_ssl, mrm, ssl, supervised, unicl  # noqa: F401  (registry)
from radjax.methods.base import Method, get_method, method_names

__all__ = ["Method", "get_method", "method_names"]
