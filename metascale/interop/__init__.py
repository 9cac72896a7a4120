"""Task sources from other libraries, as metascale task samplers.

:mod:`metascale.interop.learn2learn`: a learn2learn ``Taskset``/``TaskDataset`` as the task
sampler of :class:`~metascale.MetaTrainer` and :func:`metascale.evaluate.evaluate`. Each
integration imports its library only when used and raises
:class:`~metascale.errors.MissingExtraError` with the install command when it is missing.
"""
