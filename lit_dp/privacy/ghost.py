"""The fast engine's layer registry under its former module path.

The fast engine (book-keeping ghost clipping) lives in :mod:`lit_dp.privacy.engine`; this
module keeps ``lit_dp.privacy.ghost.register_layer`` and ``layer_kind`` importable. New code
imports them from :mod:`lit_dp.privacy.per_sample`.
"""

from lit_dp.privacy.engine.plan import ClipPlan as ClipPlan
from lit_dp.privacy.engine.recorder import GhostRecorder as GhostRecorder
from lit_dp.privacy.engine.registry import LayerRule as LayerRule
from lit_dp.privacy.engine.registry import layer_kind as layer_kind
from lit_dp.privacy.engine.registry import register_layer as register_layer
