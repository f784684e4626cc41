"""Formatting every subsystem shares: number formats (:mod:`.numbers`), the strict JSON writer (:mod:`.json`),
the plan line every estimate is shown under (:mod:`.plan`) and shared text (:mod:`.text`).

Each subsystem renders its own results next to them (``report/render/``,
``memory/render.py``, ``gpus/render.py``, ...); this package holds only what
they all use, so a count or a JSON document looks the same from every command.
"""
