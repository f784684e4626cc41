"""Step profiles derived from the trace oracle, for architectures no layer program reads.

A hand-written layer program (:mod:`peftaudit.memory.analytic.programs`) exists
for the Llama family, GPT-2 and BERT. Every other model transformers can build
(Gemma 2/3, Phi-3, gpt-oss, DeepSeek-V3, OPT, Falcon, T5...) gets its profile
from traces of a depth-reduced copy of itself (:func:`derive`): the same
segments a program records, fitted over batch and sequence sizes, so estimates
after the first are arithmetic.
"""

from __future__ import annotations

from peftaudit.memory.derived.derivation import Derived, derive
from peftaudit.memory.derived.fit import DerivationError

__all__ = ["DerivationError", "Derived", "derive"]
