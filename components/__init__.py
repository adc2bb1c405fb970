"""KFP components of ctloop, one module per step; each is a thin shell over plain functions in its module.

The component functions share their module's name (``components.train.train``), so they are imported from the
step modules, never re-exported here: a package-level ``train`` would shadow the ``components.train`` module
for ``import components.train as ...``.
"""
