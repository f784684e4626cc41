"""Built-in plugins: peftaudit's own behaviour, registered through the public hooks.

Each module here registers only; what it registers lives with its subsystem
(checks in :mod:`peftaudit.recommend.checks`, exporters in
:mod:`peftaudit.recommend.exports`, GPUs in :mod:`peftaudit.gpus.catalog`...).
Implementations are imported inside the hooks, so loading the plugins, which
every command line does, stays cheap.
"""
